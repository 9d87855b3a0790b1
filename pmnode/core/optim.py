"""The optimizer a stage steps with, and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from pmnode.config import OptimConfig
from pmnode.core.adam8 import AdamW8bit
from pmnode.core.stages import Stage
from pmnode.core.staleness import Correction, make_optimizer


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at total_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(
    stage: Stage,
    optim: OptimConfig,
    state: str = "fp32",
    fused: bool = False,
    correction: Correction = "none",
) -> torch.optim.Optimizer:
    """AdamW (`state` int8: with 8-bit moments; `fused`: torch's fused kernel; NAdamW for the
    nesterov correction) in groups: matrices with weight decay, the reparametrised writes Z apart
    (their own lr scale), vectors without decay. Each group's `lr_scale` multiplies the scheduled lr."""
    scaled = (
        {id(w.weight) for w in stage.writes() if w.mode == "reparam"} if optim.write_lr_scale != 1 else set()
    )
    params = [p for p in stage.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in scaled]
    writes = [p for p in params if id(p) in scaled]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay, "lr_scale": 1.0}]
    if writes:
        groups.append(
            {"params": writes, "weight_decay": optim.weight_decay, "lr_scale": optim.write_lr_scale}
        )
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0, "lr_scale": 1.0})
    if correction != "none":  # the correction's own optimizer keeps fp32 moments
        return make_optimizer(correction, groups, optim.lr, optim.betas, optim.eps)
    if state == "int8":
        return AdamW8bit(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused or None)
