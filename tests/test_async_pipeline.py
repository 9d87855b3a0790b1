"""The one-process async emulation (pmnode.core.async_pipeline): with one micro-batch in flight and
no correction it is `pmnode train` exactly; with more, the delays fall from the head to the tail."""

from __future__ import annotations

import torch
from helpers import WORKER_CFG

from pmnode.core.async_pipeline import AsyncPipeline
from pmnode.core.train import Pipeline

CFG = WORKER_CFG.with_overrides(
    n_stages=2,
    train={"batch_size": 4, "micro_batch_size": 2, "seq_len": 8},
    swarm={"schedule": "async", "async_correction": "none"},
)


def batch(j: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(j)
    x = torch.randint(0, 256, (4, 9), generator=g)
    return x[:, :-1], x[:, 1:]


def test_one_in_flight_without_correction_is_the_sync_trainer() -> None:
    torch.manual_seed(0)
    sync = Pipeline(CFG)
    for j in range(4):
        sync.train_step(*batch(j), total_steps=4)
    torch.manual_seed(0)
    emu = AsyncPipeline(CFG, window=1)
    stats = emu.run(batch, 4)
    assert stats.steps == [4, 4] and stats.delays == [0.0, 0.0]
    held = [batch(100)]
    assert emu.eval_loss(held) == sync.eval_loss(held)  # bit for bit: the same operations in order
    for a, b in zip(emu.workers, sync.workers, strict=True):
        for p, q in zip(a.stage.parameters(), b.stage.parameters(), strict=True):
            assert torch.equal(p, q)


def test_a_wider_window_makes_the_head_staler_than_the_tail() -> None:
    cfg = CFG.with_overrides(n_stages=2, swarm={"async_correction": "nesterov"})
    stats = AsyncPipeline(cfg, window=6, hop=2.0).run(batch, 6)
    assert stats.steps == [6, 6]
    assert stats.delays[0] > 0.5 and stats.delays[1] == 0.0  # the tail's backward follows its forward
    assert stats.time > 6 * 2 * 2  # each step's 2 micro-batches crossed a hop both ways
