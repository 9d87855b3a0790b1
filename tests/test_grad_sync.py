"""replica_sync.method grads (pmnode.core.grad_sync): R replicas' gradient sums, compressed every step,
one optimizer step on the decoded total. Exact without compression; error feedback keeps what top-k
leaves out; a swarm replica's shares decode to the same bits everywhere, count each step once, and a
malformed one is refused; async swarms refuse the method in one line."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from pmnode.config import load_config
from pmnode.config.replica_sync import ReplicaSyncConfig, check_for_swarm
from pmnode.core.compress import Malformed, round_bytes
from pmnode.core.grad_sync import GradCompressor, GradShares
from pmnode.core.replica_train import ReplicatedPipeline
from pmnode.core.share_bytes import layout
from pmnode.core.snapshot_meta import SumsMeta
from pmnode.core.train import Pipeline
from pmnode.errors import ConfigError
from pmnode.net.bulk import Received, pack
from pmnode.net.wire import WireError
from pmnode.swarm.participant import add_part

CFG = load_config("configs/tiny.yaml")


def _weights(pipe: Pipeline | ReplicatedPipeline) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for w in pipe.workers for p in w.stage.parameters()])


def test_uncompressed_shares_are_the_single_pipeline_bit_for_bit() -> None:
    cfg = CFG.with_overrides(replica_sync={"method": "grads", "compressor": "none"})
    torch.manual_seed(0)
    grads = ReplicatedPipeline(cfg, cfg.codec_spec, "cpu", 4)
    torch.manual_seed(0)
    single = Pipeline(cfg.with_overrides(train={"micro_batch_size": 2}), cfg.codec_spec, "cpu")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = (torch.randint(0, cfg.model.vocab_size, (8, cfg.train.seq_len), generator=g) for _ in "xy")
        assert grads.train_step(x, y, 10) == single.train_step(x, y, 10)
    assert torch.equal(_weights(grads), _weights(single))
    assert grads.rounds == 3 and grads.bytes_per_round[0] == 4 * sum(
        p.numel() for p in grads.workers[0].stage.parameters() if p.requires_grad
    )


def test_top_k_keeps_what_it_leaves_out_for_the_next_step() -> None:
    rs = CFG.replica_sync.model_copy(
        update={"method": "grads", "compressor": "topk", "exact_below": 0, "error_feedback": 1.0}
    )
    p = torch.nn.Parameter(torch.zeros(64, 128))
    shares = GradShares([p], rs, seed=0)
    g1, g2 = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)), torch.randn(64, 128)
    (d1,) = shares.share([g1])
    assert d1 is not None and 0 < int((d1 != 0).sum()) <= 0.02 * g1.numel()  # 1% of each 4,096-chunk
    torch.testing.assert_close(d1 + shares.residual[0], g1)  # nothing lost: the rest waits
    (d2,) = shares.share([g2])
    torch.testing.assert_close(d1 + d2 + shares.residual[0], g1 + g2, rtol=0, atol=1e-5)
    assert shares.share([None]) == [None]  # a parameter without gradients sends none


def test_async_swarms_refuse_it() -> None:
    cfg = CFG.with_overrides(replica_sync={"method": "grads"})
    check_for_swarm(cfg.replica_sync, "sync")
    with pytest.raises(ConfigError, match=r"needs swarm.schedule: sync"):
        check_for_swarm(cfg.replica_sync, "async")


# ---- a swarm replica's side (pmnode.swarm.participant): flat sums in, bytes and decoded sums out

SHAPES = [(64, 128), (128,), (32, 256)]


def _rs(**update: object) -> ReplicaSyncConfig:
    base = {"method": "grads", "compressor": "topk", "exact_below": 1000, "error_feedback": 1.0}
    return CFG.replica_sync.model_copy(update={**base, **update})


def _sums(seed: int) -> torch.Tensor:
    return torch.randn(sum(math.prod(s) for s in SHAPES), generator=torch.Generator().manual_seed(seed))


def test_a_replica_share_decodes_to_the_same_bits_everywhere() -> None:
    a, b = GradCompressor(SHAPES, _rs(), 0), GradCompressor(SHAPES, _rs(), 7)
    buf, mine = a.share(3, _sums(1))
    assert buf.dtype == torch.uint8 and buf.numel() == a.nbytes == round_bytes(SHAPES, _rs())
    assert a.nbytes < 0.04 * 4 * _sums(1).numel()  # top-k 1% at 14-bit codes; the 128-vector goes exact
    assert torch.equal(b.decode(buf), mine)  # what another replica adds is what this one adds
    # the small tensor travels exactly; the others keep what they dropped for later
    torch.testing.assert_close(mine + torch.cat([r.reshape(-1) for r in a.residual]), _sums(1))
    exact = GradCompressor(SHAPES, _rs(compressor="none"), 0)
    buf, mine = exact.share(0, _sums(1))
    assert torch.equal(mine, _sums(1)) and torch.equal(exact.decode(buf), _sums(1))  # none: exact


def test_a_step_counts_its_sums_once_in_the_error_feedback() -> None:
    c, fresh = GradCompressor(SHAPES, _rs(), 0), GradCompressor(SHAPES, _rs(), 0)
    c.share(0, _sums(1))
    fresh.share(0, _sums(1))
    first = c.share(1, _sums(2))
    again = c.share(1, _sums(2))  # its own prepare, then a peer's fetch: the same bytes
    assert first[0] is again[0]
    changed = c.share(1, _sums(3))  # micro-batches came again: the step's sums changed
    want = fresh.share(1, _sums(3))  # as if step 1 had only ever had these sums
    assert torch.equal(changed[0], want[0]) and torch.equal(changed[1], want[1])
    for r, w in zip(c.residual, fresh.residual, strict=True):
        assert torch.equal(r, w)
    c.share(2, _sums(4))  # the next step builds on step 1's residual
    fresh.share(2, _sums(4))
    assert all(torch.equal(r, w) for r, w in zip(c.residual, fresh.residual, strict=True))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b[:-1], "bytes"),
        (lambda b: torch.cat([b, b[:1]]), "bytes"),
        (lambda b: _poke_scale(b, float("nan")), "non-finite"),
        (lambda b: _poke_scale(b, -1.0), "scales"),
    ],
)
def test_a_malformed_share_is_refused(damage: Callable[[torch.Tensor], torch.Tensor], reason: str) -> None:
    c = GradCompressor(SHAPES, _rs(), 0)
    buf, _ = c.share(0, _sums(1))
    with pytest.raises(Malformed, match=reason):
        c.decode(damage(buf.clone()))


def _poke_scale(buf: torch.Tensor, value: float) -> torch.Tensor:
    """The first chunk scale of the first tensor (its codes come first, then (chunks, 2) fp16)."""
    parts = layout(SHAPES[0], _rs())
    at = math.prod(parts[0][1])
    buf[at : at + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8)
    return buf


def test_a_received_share_is_decoded_checked_and_refused_as_bad_gradient() -> None:
    c = GradCompressor(SHAPES, _rs(), 0)
    buf, mine = c.share(0, _sums(1))
    like = _sums(1)
    snap = pack({"g": buf}, SumsMeta(samples=4, step=0))
    got = Received(snap.manifest, snap.buffer)
    total = add_part(None, got, like, None, c.decode)
    assert torch.equal(total, mine)
    bad = pack({"g": buf[:-1]}, SumsMeta(samples=4, step=0))
    got = Received(bad.manifest, bad.buffer)
    with pytest.raises(WireError, match="compressed share"):
        add_part(None, got, like, None, c.decode)
