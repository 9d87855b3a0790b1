"""Replica pseudo-gradient compressors and the outer loop (pmnode.core.compress, pmnode.core.outer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pmnode.config import ReplicaSyncConfig
from pmnode.core.compress import (
    Compressed,
    Malformed,
    compress,
    compressed_bytes,
    decompress,
    initial_q,
    pack_bits,
    unpack_bits,
)
from pmnode.core.outer import OuterSync, Share

TOPK = ReplicaSyncConfig(method="outer", compressor="topk", exact_below=0, topk_chunk=64, topk_fraction=0.125)


def test_bit_packing_round_trips() -> None:
    codes = torch.randint(0, 1 << 14, (1001,))
    packed = pack_bits(codes, 14)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * 14 // 8)
    assert torch.equal(unpack_bits(packed, 14, 1001), codes)


def test_topk_keeps_each_chunks_largest_with_their_signs() -> None:
    t = torch.zeros(128)
    t[3], t[70], t[100] = 5.0, -2.0, 0.5
    c = compress(t, TOPK)
    assert c.kind == "topk" and c.nbytes() == compressed_bytes((128,), TOPK)
    out = decompress(c, (128,), TOPK)
    # 8 kept per chunk of 64; 2-bit values: the extremes of each chunk come back exactly (to fp16)
    assert out[3] == pytest.approx(5.0, rel=1e-3) and out[70] == pytest.approx(-2.0, rel=1e-3)
    assert float(out[100]) >= 0 and int((out != 0).sum()) <= 3


def test_topk_bytes_are_under_a_hundredth_of_fp16() -> None:
    cfg = ReplicaSyncConfig(method="outer")  # the defaults: 1% of 4096-value chunks at 2 bits
    shape = (4096, 14336)
    assert compressed_bytes(shape, cfg) <= 2 * 4096 * 14336 / 100
    assert compressed_bytes((100,), cfg) == 400  # small tensors go exactly


def test_lowrank_recovers_a_low_rank_matrix() -> None:
    cfg = ReplicaSyncConfig(method="outer", compressor="powersgd", powersgd_rank=4, exact_below=0)
    m = torch.randn(64, 4) @ torch.randn(4, 48)
    c = compress(m, cfg, initial_q((64, 48), 4, 0))
    assert c.kind == "lowrank" and c.nbytes() == 2 * (64 + 48) * 4
    assert torch.allclose(decompress(c, (64, 48), cfg), m, atol=0.05 * float(m.abs().max()))


@pytest.mark.parametrize(
    "bad",
    [
        lambda c: Compressed("exact", c.parts),  # wrong kind
        lambda c: Compressed("topk", [c.parts[0][:-1], c.parts[1]]),  # short
        lambda c: Compressed("topk", [c.parts[0], torch.full_like(c.parts[1], float("nan"))]),
        lambda c: Compressed("topk", [c.parts[0], c.parts[1].flip(1)]),  # hi < lo
        lambda c: Compressed("topk", [torch.full_like(c.parts[0], 255), c.parts[1]]),  # index past the end
    ],
)
def test_malformed_shares_are_refused(bad) -> None:
    c = compress(torch.randn(100), TOPK)  # 2 chunks, the second 36 values long
    with pytest.raises(Malformed):
        decompress(bad(c), (100,), TOPK)


def _replicas(cfg: ReplicaSyncConfig, n: int = 2) -> tuple[list[nn.Linear], list[OuterSync]]:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    mods = [nn.Linear(8, 8) for _ in range(n)]
    for m in mods:
        m.load_state_dict(base.state_dict())
    return mods, [OuterSync(list(m.parameters()), cfg) for m in mods]


def test_uncompressed_outer_step_is_parameter_averaging() -> None:
    cfg = ReplicaSyncConfig(
        method="outer", compressor="none", error_feedback=0, overlap=False, outer_lr_scale="none"
    )
    mods, syncs = _replicas(cfg)
    with torch.no_grad():
        mods[0].weight.add_(1.0)
        mods[1].weight.sub_(3.0)
    expected = (mods[0].weight + mods[1].weight) / 2
    shares = [s.start() for s in syncs]
    for s in syncs:
        s.finish(shares)
    for m in mods:
        assert torch.allclose(m.weight, expected, atol=1e-6)
    assert torch.equal(mods[0].weight, mods[1].weight)


def test_inner_steps_in_flight_are_kept_as_a_delta() -> None:
    cfg = ReplicaSyncConfig(method="outer", compressor="none", error_feedback=0, outer_lr_scale="none")
    mods, syncs = _replicas(cfg)
    before = mods[0].weight.detach().clone()
    shares = [s.start() for s in syncs]  # nothing trained: the anchor stays
    with torch.no_grad():
        mods[0].weight.add_(0.25)  # an inner step while the round is in flight
    for s in syncs:
        s.finish(shares)
    assert torch.allclose(mods[0].weight, before + 0.25) and torch.allclose(mods[1].weight, before)


def test_samples_weight_the_mean_and_a_negative_count_is_refused() -> None:
    cfg = ReplicaSyncConfig(
        method="outer", compressor="none", error_feedback=0, overlap=False, outer_lr_scale="none"
    )
    mods, syncs = _replicas(cfg)
    w = mods[0].weight.detach().clone()
    with torch.no_grad():
        mods[1].weight.add_(4.0)
    syncs[0].note_samples(1)
    syncs[1].note_samples(3)
    shares = [s.start() for s in syncs]
    syncs[0].finish(shares)
    assert torch.allclose(mods[0].weight, w + 3.0, atol=1e-6)
    lying = dataclasses.replace(shares[1], samples=-3)
    with pytest.raises(Malformed):
        syncs[1].check(lying)
    with pytest.raises(Malformed):
        syncs[1].check(Share(7, 1, shares[1].tensors))  # another round's share


def test_error_feedback_sends_what_top_k_left_out() -> None:
    cfg = TOPK.model_copy(update={"error_feedback": 1.0})
    mods, syncs = _replicas(cfg, 1)
    with torch.no_grad():
        mods[0].weight.add_(torch.linspace(0.1, 1.0, 64).reshape(8, 8))
    target = mods[0].weight.detach().clone()
    for _ in range(12):  # no more training: error feedback carries the rest over the rounds
        syncs[0].finish([syncs[0].start()])
    # the anchor walks to the weights the replica trained to
    assert torch.allclose(syncs[0].anchor[0], target, atol=0.05)


def test_replicated_pipeline_keeps_its_replicas_together() -> None:
    from pmnode.config import load_config
    from pmnode.core.replica_train import ReplicatedPipeline

    cfg = load_config("tiny").with_overrides(
        replica_sync={
            "method": "outer",
            "compressor": "none",
            "inner_steps": 2,
            "overlap": False,
            "outer_lr_scale": "none",
        }
    )
    pipe = ReplicatedPipeline(cfg, cfg.codec_spec, "cpu", replicas=2)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (cfg.train.batch_size, cfg.train.seq_len))
    losses = [pipe.train_step(x, x.roll(-1, 1), 4) for _ in range(4)]
    assert pipe.rounds == 2 and losses[-1] < losses[0]
    for a, b in zip(pipe.lanes[0].workers, pipe.lanes[1].workers, strict=True):
        for pa, pb in zip(a.stage.parameters(), b.stage.parameters(), strict=True):
            assert torch.equal(pa, pb)  # the same anchor, bit for bit, after a blocking round
    assert pipe.bytes_per_round == [
        sum(4 * p.numel() for p in w.stage.parameters() if p.requires_grad) for w in pipe.workers
    ]


def test_the_outer_step_grows_with_the_square_root_of_the_replicas() -> None:
    for scale, split, factor in [("sqrt_replicas", False, 2), ("auto", True, 2), ("auto", False, 1)]:
        cfg = ReplicaSyncConfig(
            method="outer", compressor="none", error_feedback=0, overlap=False, outer_lr_scale=scale
        )
        mods, _ = _replicas(cfg, 4)
        syncs = [OuterSync(list(m.parameters()), cfg, split_batch=split) for m in mods]
        w = mods[0].weight.detach().clone()
        with torch.no_grad():
            for m in mods:
                m.weight.add_(0.5)  # every replica took the same step
        shares = [s.start() for s in syncs]
        syncs[0].finish(shares)
        # sqrt(4) x the mean step where the replicas split each batch (auto), or when asked for
        assert torch.allclose(mods[0].weight, w + 0.5 * factor, atol=1e-6), (scale, split)


def test_a_swarm_refuses_rounds_that_do_not_overlap() -> None:
    from pmnode.config.replica_sync import ReplicaSyncConfig, check_for_swarm
    from pmnode.errors import ConfigError

    check_for_swarm(ReplicaSyncConfig(method="outer"), "sync")
    check_for_swarm(ReplicaSyncConfig(method="step", overlap=False), "sync")  # no rounds: nothing to overlap
    with pytest.raises(ConfigError, match="overlap: false"):
        check_for_swarm(ReplicaSyncConfig(method="outer", overlap=False), "async")
