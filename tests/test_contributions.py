"""Checked contributions: a replica's gradient sum must be like ours (shape, dtype, finite, bounded) and
its sample count within the step's batch, or it is refused before it touches the sum; activations and
gradients carry a magnitude bound beside their layout check; a state copy with NaN is not loaded."""

from __future__ import annotations

import pytest
import torch
from test_validate import check, mutated, real_packet

from pmnode.config import load_config
from pmnode.core.codecs import make_codec
from pmnode.core.replica_state import load_state_tensors, state_tensors
from pmnode.core.snapshot_meta import SumsMeta
from pmnode.core.worker import StageWorker
from pmnode.errors import PmnodeError
from pmnode.net.bulk import Received, pack
from pmnode.net.checks import MAX_ABS, GradScale, check_gradient, check_samples
from pmnode.net.wire import WireError
from pmnode.swarm.participant import add_part


def _received(g: torch.Tensor, samples: int = 8) -> Received:
    snap = pack({"g": g}, SumsMeta(samples=samples, step=0))
    return Received(snap.manifest, snap.buffer)


def test_a_replicas_sum_must_be_like_ours() -> None:
    ours = torch.ones(1000)
    total = add_part(None, ours, ours)
    for bad, why in (
        (torch.full((1,), 1e3), "shape"),  # would broadcast over every entry
        (torch.ones(1000, dtype=torch.bfloat16), "shape"),
        (torch.cat([torch.ones(999), torch.tensor([float("nan")])]), "reaches nan"),
        (torch.full((1000,), 3e38), "beyond"),
    ):
        with pytest.raises(WireError, match=why) as e:
            add_part(total, _received(bad), ours)
        assert e.value.reason == "bad gradient"
    with pytest.raises(WireError, match="shape"):  # a snapshot without the sum
        add_part(total, Received(pack({}, SumsMeta(samples=0, step=0)).manifest, bytearray()), ours)
    assert torch.equal(total, ours)  # nothing refused reached the sum
    assert torch.equal(add_part(total, _received(torch.full((1000,), 2.0)), ours), torch.full((1000,), 3.0))


def test_a_sample_count_is_bounded_by_the_steps_batch() -> None:
    assert check_samples(8, 16) == 8 and check_samples(0, 16) == 0
    for bad in (-8, 17, 10**9, True, "8", 8.0, None):
        with pytest.raises(WireError, match="samples"):
            check_samples(bad, 16)


def test_huge_but_finite_activations_are_refused() -> None:
    p, w = real_packet("dense")
    key = next(k for k, v in p.tensors.items() if v.is_floating_point() and v.dim() >= 2)
    check(p, w)
    with pytest.raises(WireError, match="beyond"):
        check(mutated(p, **{key: torch.full_like(p.tensors[key], 3e38)}), w)
    spike = p.tensors[key].clone()
    spike.view(-1)[0] = 2 * MAX_ABS
    with pytest.raises(WireError, match="beyond"):
        check(mutated(p, **{key: spike}), w)


def test_huge_gradients_are_refused_even_before_the_median_warms_up() -> None:
    codec = make_codec("dense", d_model=32, vocab_size=64, subspace=None)
    scale = GradScale(ratio=100.0, warmup=8)
    with pytest.raises(WireError, match="beyond") as e:
        check_gradient(codec.pack_gradient(torch.full((2, 5, 32), 3e38)), codec, (2, 5), scale)
    assert e.value.reason == "bad gradient" and len(scale.norms) == 0


def test_a_state_copy_with_nan_is_not_loaded() -> None:
    cfg = load_config("tiny").with_overrides(n_stages=2)
    src, dst = StageWorker(cfg, 1, cfg.codec_spec), StageWorker(cfg, 1, cfg.codec_spec)
    before = {k: v.clone() for k, v in dst.stage.state_dict().items()}
    tensors, meta = state_tensors(src)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    with pytest.raises(PmnodeError, match="NaN"):
        load_state_tensors(dst, tensors, meta)
    assert all(torch.equal(v, before[k]) for k, v in dst.stage.state_dict().items())


def test_a_replicas_sum_far_above_the_recent_median_is_refused() -> None:
    ours, scale = torch.ones(1000), GradScale(ratio=100.0, warmup=8)
    total = add_part(None, ours, ours)
    for i in range(8):  # the median of the parts received lately: about sqrt(1000)
        total = add_part(total, _received(torch.full((1000,), 1.0 + i / 8)), ours, scale)
    kept = total.clone()
    with pytest.raises(WireError, match="median") as e:
        add_part(total, _received(torch.full((1000,), 500.0)), ours, scale)  # finite, within MAX_ABS
    assert e.value.reason == "bad gradient" and torch.equal(total, kept)
    add_part(total, _received(torch.full((1000,), 50.0)), ours, scale)  # 50x the median still passes
