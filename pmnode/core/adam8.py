"""AdamW with 8-bit moments: 2 bytes of optimizer state per parameter instead of 8.

Both moments are kept in blocks of BLOCK values with one fp32 scale per block:
    m  linear int8, scale = the block's absmax / 127
    v  logarithmic uint8 (v >= 0 spans decades): code = round(-8 log2(v / block max)), 0..255,
       so v is kept to 2^(1/16) (4.4%) relative error and sqrt(v), the update's divisor, to 2.2%,
       down to 2^-32 of the block's largest value.
Each step dequantizes one parameter's moments, updates them exactly as torch's AdamW does
(decoupled weight decay, bias correction), and quantizes them again; the transient is one tensor.
Its cost against fp32 AdamW is measured in docs/benchmarks/memory/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

BLOCK = 256
_V_STEPS = 8.0  # codes per octave of v


def _blocks(n: int) -> int:
    return math.ceil(n / BLOCK)


def quantize_m(m: Tensor) -> tuple[Tensor, Tensor]:
    """(blocks, BLOCK) fp32 -> int8 codes, fp32 scales."""
    scale = m.abs().amax(1) / 127.0
    q = torch.where(scale[:, None] > 0, m / scale.clamp_min(1e-38)[:, None], 0.0)
    return q.round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_v(v: Tensor) -> tuple[Tensor, Tensor]:
    """(blocks, BLOCK) fp32 >= 0 -> uint8 log codes, fp32 block maxima."""
    top = v.amax(1)
    ratio = v / top.clamp_min(1e-38)[:, None]
    code = (-_V_STEPS * torch.log2(ratio.clamp_min(2.0**-40))).round_().clamp_(0, 255)
    return code.to(torch.uint8), top


def dequantize_m(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


def dequantize_v(code: Tensor, top: Tensor) -> Tensor:
    return torch.exp2(code.float() / -_V_STEPS) * top[:, None]


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with 8-bit moments (see the module's docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        b = _blocks(p.numel())
        zeros = torch.zeros(b, device=p.device)
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "m_q": torch.zeros(b, BLOCK, dtype=torch.int8, device=p.device),
            "m_scale": zeros.clone(),
            "v_q": torch.full((b, BLOCK), 255, dtype=torch.uint8, device=p.device),
            "v_top": zeros,
        }

    @torch.no_grad()
    # torch's step overloads return the closure's loss; this optimizer takes no closure and returns None
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                n = p.numel()
                g = torch.zeros(state["m_q"].numel(), device=p.device)
                g[:n] = p.grad.reshape(-1).float()
                g = g.view(-1, BLOCK)
                m = dequantize_m(state["m_q"], state["m_scale"]).mul_(beta1).add_(g, alpha=1 - beta1)
                v = dequantize_v(state["v_q"], state["v_top"]).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["step"] += 1
                t = float(state["step"])
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                update = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
                p.mul_(1 - lr * wd)
                p.add_(update.reshape(-1)[:n].view_as(p).to(p.dtype), alpha=-lr)
                state["m_q"], state["m_scale"] = quantize_m(m)
                state["v_q"], state["v_top"] = quantize_v(v)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's float dtype; the codes go back to 8 bits (exact:
        they are small integers)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, dtype in (("m_q", torch.int8), ("v_q", torch.uint8)):
                if key in state:
                    state[key] = state[key].to(dtype)
