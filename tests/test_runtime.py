"""StageWorker bookkeeping: sample accounting, sync guard, weight stashing for async."""

from __future__ import annotations

import pytest
import torch
from helpers import WORKER_CFG as CFG
from helpers import grad_packet, toks

from pmnode.core.optim import lr_at
from pmnode.core.worker import StageWorker
from pmnode.errors import PmnodeError


def test_sync_step_refuses_inflight() -> None:
    w = StageWorker(CFG, 0)
    w.forward("a", tokens=toks(0), samples=2)
    with pytest.raises(PmnodeError, match="1 micro-batches in flight"):
        w.step()


def test_step_applies_finished_samples() -> None:
    w = StageWorker(CFG, 0)
    for i in range(3):
        w.forward(str(i), tokens=toks(i), samples=2)
        w.backward(str(i), grad_packet(i))
    before = w.stage.embed.weight.detach().clone()
    applied, lr = w.step(10)
    assert applied == 6 and lr == pytest.approx(CFG.optim.lr)
    assert w.samples_ready == 0 and w.step_count == 1
    assert not torch.equal(before, w.stage.embed.weight)


def test_stashed_weights_give_forward_time_gradients() -> None:
    ref = StageWorker(CFG, 0)
    ref.forward("a", tokens=toks(0), samples=2)
    ref.backward("a", grad_packet(0))
    expect = {n: p.grad.clone() for n, p in ref.stage.named_parameters() if p.grad is not None}

    w = StageWorker(CFG, 0, stash_weights=True)
    w.forward("a", tokens=toks(0), samples=2)  # runs with version 0
    w.forward("b", tokens=toks(1), samples=2)
    w.backward("b", grad_packet(1))
    applied, _ = w.step(10)  # "a" is still in flight: allowed with stashing
    assert applied == 2 and w.step_count == 1
    w.backward("a", grad_packet(0))  # the graph of version 0 is intact
    assert w.samples_ready == 2
    w._collect_grads()
    got = dict(w.stage.named_parameters())
    for name, g in expect.items():
        assert torch.allclose(got[name].grad, g, rtol=1e-5, atol=1e-7), name
    assert w._stashes == {} or set(w._stashes) == {1}


def test_abandon_forgets_microbatch() -> None:
    w = StageWorker(CFG, 0)
    w.forward("a", tokens=toks(0), samples=2)
    assert w.abandon("a") and not w.abandon("a")
    assert w.step()[0] == 0


def test_lr_schedule() -> None:
    o = CFG.optim.model_copy(update={"warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)
    assert lr_at(110, o, 110) == pytest.approx(0.1)


def test_bf16_autocast_keeps_the_wire_fp32() -> None:
    w = StageWorker(CFG, 0, autocast_bf16=True)  # this machine's choice, not the run's
    p = w.forward("a", tokens=toks(0), samples=2)
    assert p.tensors["v"].dtype == torch.float32
    w.backward("a", grad_packet(0))
    assert w.stage.embed.weight.grad is not None and w.stage.embed.weight.grad.dtype == torch.float32
