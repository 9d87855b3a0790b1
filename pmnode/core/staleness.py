r"""Stale-gradient correction for the async schedule (`swarm.async_correction`).

Under `async` a micro-batch's forward runs at this stage's weights of step v (its version) and its
gradient is applied at a later step t: its delay is tau = t - v, counted by the stage itself (the
worker records v at the forward and t when the step applies the gradient; the id's step, which the
envelope carries, is the head's, and a stage's own count is what its weights moved by). Weight
stashing keeps the backward consistent with its forward, so the gradient is exact for w_v but is
applied at w_t. Three ways to handle that:

none      AdamW on the stale gradient, as before.

nesterov  The delay-corrected Nesterov method of Ajanthan et al., arXiv 2505.01099 (ICML 2025). NAG
          evaluates the gradient at a look-ahead point; the paper's change is to make the look-ahead
          cover the delay: with a momentum near 1 the update is dominated by the momentum direction,
          and the (NAdam-form) look-ahead extrapolates along it, so a gradient taken tau steps back
          still points where the weights are going. As in the authors' released code, the step is
          NAdamW (decoupled weight decay) whose first beta grows with the delay the stage sees:

              b1(tau) = b1 + (b_max - b1) * min(tau, S) / S        (S = n_stages, b_max = async_momentum)

              m_t = b1 m_{t-1} + (1 - b1) g_{t-tau}       v_t = b2 v_{t-1} + (1 - b2) g_{t-tau}^2
              w_{t+1} = w_t (1 - lr wd) - lr [ (1 - mu_t) g / (1 - P_t) + mu_{t+1} m_t / (1 - P_t mu_{t+1}) ]
                                               / (sqrt(v_t / (1 - b2^t)) + eps)           P_t = prod mu_i

          with a constant mu_t = b1 (Nesterov's look-ahead as it is). torch's NAdam (and the released
          code) warms mu up as b1 (1 - 0.5 * 0.96^(0.004 t)): about b1 / 2 for the first thousand
          steps, so a stage's look-ahead is half of what the delay asks for, and even a stage with no
          delay learns slower than AdamW (measured on d192 in one process: +6.5% held-out at step 100
          with no delay at all; with mu_t = b1, -1.0%; docs/benchmarks/async/method/).

          tau is the mean delay of the samples this step applies (fractional: with n micro-batches per
          step a window of W in flight is about W / n steps stale). The last stage sees tau = 0 and gets
          plain NAdamW. Where this may differ from the paper: the paper states the method for a fixed
          per-stage delay of one micro-batch per step; we measure tau per step, in steps of many
          micro-batches, and normalise by S the way the released code's `adaptive_momentum` does.

predict   Weight prediction (PipeMare / SpecTrain): the forward (and so its stashed backward) runs at
          w_v + tau_hat * (w_v - w_{v-1}), the weights extrapolated over the delay the micro-batch is
          expected to have, tau_hat an exponential average of the measured delays. The gradient is
          then taken near the weights it will be applied to.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Correction = Literal["none", "nesterov", "predict"]
EMA = 0.1  # weight of the newest step's delay in tau_hat
# torch's NAdam momentum_decay psi gives mu_t = b1 (1 - 0.5 * 0.96^(psi t)): this psi makes 0.96^(psi t)
# zero from the first step, so mu_t = b1 throughout (see the nesterov entry above).
CONSTANT_MOMENTUM = 1e6


def delay_momentum(beta1: float, delay: float, n_stages: int, beta_max: float) -> float:
    """nesterov: the first beta for gradients `delay` steps late (beta1 at 0, beta_max from n_stages on)."""
    if beta_max <= beta1:
        return beta1
    frac = min(max(delay, 0.0), float(n_stages)) / max(n_stages, 1)
    return beta1 + (beta_max - beta1) * frac


class DelayMeter:
    """Delays of the gradients a stage applies: per step (sample-weighted mean) and their average."""

    def __init__(self) -> None:
        self.versions = 0  # sum of version x samples over the finished, not yet applied samples
        self.samples = 0
        self.last = 0.0  # mean delay of the last step's samples
        self.expected = 0.0  # tau_hat: exponential average over steps
        self.steps = 0

    def finished(self, version: int, samples: int) -> None:
        self.versions += version * samples
        self.samples += samples

    def applied(self, step: int) -> float:
        """The step that applies the finished samples is `step`: their mean delay (0 if none)."""
        if self.samples:
            self.last = step - self.versions / self.samples
            self.expected = self.last if self.steps == 0 else (1 - EMA) * self.expected + EMA * self.last
            self.steps += 1
        else:
            self.last = 0.0
        self.versions = self.samples = 0
        return self.last

    def forget(self) -> None:
        self.versions = self.samples = 0


class StaleCorrection:
    """One stage's correction: sets the nesterov momentum before a step, keeps the last step's
    displacement for `predict` and extrapolates the weights a new forward runs with."""

    def __init__(self, kind: Correction, n_stages: int, beta_max: float) -> None:
        self.kind, self.n_stages, self.beta_max = kind, n_stages, beta_max
        self.meter = DelayMeter()
        self.delta: dict[str, Tensor] = {}  # predict: w_t - w_{t-1}, trainable parameters only
        self._before: dict[str, Tensor] = {}

    def before_step(self, optimizer: torch.optim.Optimizer, stage: nn.Module, step: int) -> float:
        """Record the delay of what this step applies; returns it."""
        delay = self.meter.applied(step)
        if self.kind == "nesterov":
            for g in optimizer.param_groups:
                b1 = g.setdefault("base_beta1", g["betas"][0])
                g["betas"] = (delay_momentum(b1, delay, self.n_stages, self.beta_max), g["betas"][1])
        elif self.kind == "predict":
            self._before = {n: p.detach().clone() for n, p in stage.named_parameters() if p.requires_grad}
        return delay

    @torch.no_grad()
    def after_step(self, stage: nn.Module) -> None:
        if self.kind == "predict" and self._before:
            for n, p in stage.named_parameters():
                if n in self._before:
                    self.delta[n] = p.detach() - self._before[n]
            self._before = {}

    @torch.no_grad()
    def forward_weights(self, stage: nn.Module) -> dict[str, Tensor]:
        """The weights a new micro-batch's forward runs with (a stash: fresh leaf tensors)."""
        tau = self.meter.expected if self.kind == "predict" else 0.0
        out = {}
        for n, p in stage.named_parameters():
            w = p.detach().clone()
            if tau > 0 and n in self.delta:
                w.add_(self.delta[n], alpha=tau)
            out[n] = w.requires_grad_()
        return out


def make_optimizer(kind: Correction, groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
    """AdamW, or for nesterov NAdamW with decoupled weight decay (the paper's base optimizer)."""
    if kind == "nesterov":
        return torch.optim.NAdam(
            groups, lr=lr, betas=betas, eps=eps, decoupled_weight_decay=True, momentum_decay=CONSTANT_MOMENTUM
        )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
