"""Stale-gradient correction: delays measured per micro-batch, the delay-aware NAdamW update and
weight prediction, against hand computations on toy problems with known delays."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import WORKER_CFG as CFG
from helpers import grad_packet, toks
from torch import nn

from pmnode.core.codecs import Packet
from pmnode.core.staleness import DelayMeter, StaleCorrection, delay_momentum, make_optimizer
from pmnode.core.worker import StageWorker

LR, WD, B1, B2, EPS = 0.1, 0.01, 0.9, 0.95, 1e-8


class Toy(nn.Module):
    def __init__(self, w0: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))


def test_delay_momentum() -> None:
    assert delay_momentum(0.9, 0.0, 4, 0.99) == 0.9
    assert delay_momentum(0.9, 2.0, 4, 0.99) == pytest.approx(0.945)
    assert delay_momentum(0.9, 9.0, 4, 0.99) == pytest.approx(0.99)  # capped at n_stages
    assert delay_momentum(0.95, 3.0, 4, 0.9) == 0.95  # a smaller cap never lowers the momentum


def test_meter_weights_delays_by_samples() -> None:
    m = DelayMeter()
    m.finished(version=0, samples=2)
    m.finished(version=1, samples=6)
    assert m.applied(step=3) == pytest.approx(3 - 6 / 8)  # (2*3 + 6*2) / 8
    assert m.expected == pytest.approx(2.25)
    m.finished(version=3, samples=1)
    assert m.applied(step=4) == 1.0
    assert m.expected == pytest.approx(0.9 * 2.25 + 0.1 * 1.0)
    assert m.applied(step=5) == 0.0 and m.expected == pytest.approx(2.125)  # an empty step: no sample


def test_nesterov_update_with_known_delay_matches_hand_computation() -> None:
    """f(w) = a w^2 / 2 with every gradient taken 2 steps late (at w_{t-2}), four stages."""
    a, delay, stages = 3.0, 2, 4
    toy = Toy(1.0)
    corr = StaleCorrection("nesterov", stages, beta_max=0.99)
    opt = make_optimizer("nesterov", [{"params": [toy.w], "weight_decay": WD}], LR, (B1, B2), EPS)
    history = [1.0]
    for t in range(5):
        version = max(t - delay, 0)
        toy.w.grad = torch.tensor([a * history[version]], dtype=torch.float64)
        corr.meter.finished(version, 1)
        corr.before_step(opt, toy, t)
        opt.step()
        history.append(toy.w.item())

    w, m, v, prod, hand = 1.0, 0.0, 0.0, 1.0, [1.0]
    for t in range(5):
        tau = t - max(t - delay, 0)
        b1 = B1 + (0.99 - B1) * min(tau, stages) / stages
        g = a * hand[max(t - delay, 0)]
        n = t + 1
        mu = mu_next = b1  # constant momentum: no NAdam warm-up of mu (CONSTANT_MOMENTUM)
        prod *= mu
        w *= 1 - LR * WD
        m = b1 * m + (1 - b1) * g
        v = B2 * v + (1 - B2) * g * g
        denom = math.sqrt(v / (1 - B2**n)) + EPS
        w -= LR * (1 - mu) / (1 - prod) * g / denom + LR * mu_next / (1 - prod * mu_next) * m / denom
        hand.append(w)
    assert history == pytest.approx(hand, rel=1e-6)  # torch keeps mu and its product in float32
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.945)


def test_predict_extrapolates_by_the_expected_delay() -> None:
    toy = Toy(2.0)
    corr = StaleCorrection("predict", 4, beta_max=0.99)
    opt = make_optimizer("predict", [{"params": [toy.w], "weight_decay": 0.0}], LR, (B1, B2), EPS)
    assert corr.forward_weights(toy)["w"].item() == 2.0  # nothing measured yet: the weights as they are
    toy.w.grad = torch.tensor([0.5], dtype=torch.float64)
    corr.meter.finished(version=-3, samples=1)  # applied at step 0: 3 steps late
    corr.before_step(opt, toy, 0)
    opt.step()
    corr.after_step(toy)
    # AdamW's first step moves by lr * g / (|g| + eps'): about -lr; predicted = w1 + 3 * (w1 - w0)
    w1 = toy.w.item()
    assert w1 == pytest.approx(2.0 - LR, rel=1e-6)
    ahead = corr.forward_weights(toy)["w"]
    assert ahead.requires_grad and ahead.item() == pytest.approx(w1 + 3 * (w1 - 2.0), rel=1e-12)


def test_worker_measures_the_delay_and_sets_the_momentum() -> None:
    """A micro-batch forwarded at step 0 whose gradient the third step applies is 2 steps late."""
    w = StageWorker(CFG, 0, stash_weights=True, correction="nesterov")
    assert isinstance(w.optimizer, torch.optim.NAdam)
    w.forward("a", tokens=toks(0), samples=2)
    w.step(10)
    w.step(10)
    w.backward("a", grad_packet(0))
    w.step(10)
    assert w.correction.meter.last == 2.0
    assert w.optimizer.param_groups[0]["betas"][0] == pytest.approx(0.99)  # 2 stages: 2 late is the cap


def test_sync_worker_keeps_adamw() -> None:
    w = StageWorker(CFG, 0, correction="nesterov")  # no stashing: no gradient is ever late
    assert type(w.optimizer) is torch.optim.AdamW and w.correction.kind == "none"


def test_predict_worker_runs_the_forward_ahead() -> None:
    w = StageWorker(CFG, 0, stash_weights=True, correction="predict")
    w.forward("a", tokens=toks(0), samples=2)
    w.forward("b", tokens=toks(1), samples=2)
    w.backward("b", grad_packet(1))
    w.step(10)  # "b": 0 steps late
    w.step(10)
    w.backward("a", grad_packet(0))  # 2 steps late
    w.step(10)
    before = {n: p.detach().clone() for n, p in w.stage.named_parameters()}
    tau = w.correction.meter.expected
    assert tau == pytest.approx(0.9 * 0 + 0.1 * 2)
    out = w.forward("c", tokens=toks(2), samples=2)
    assert isinstance(out, Packet)
    stash = w._stashes[w.step_count]
    for n, d in w.correction.delta.items():
        assert torch.allclose(stash[n], before[n] + tau * d), n
