"""What a trained model does with its residual stream: the measurements behind the fidelity study.

For each layer l, on held-out batches, with r_l = x_l - F[tok] the stream's trainable part
(x_l itself for a model without F):
    dims90   principal directions holding 90% of r_l's energy (uncentered)   -- the width it uses
    in_span  ||U^T r_l||^2 / ||r_l||^2                                      -- what a boundary keeps
For each residual write W (d, n): its stable rank ||W||_F^2 / sigma_max^2 and entropy rank.
For each layer: the gradient norm of its parameters on one held-out batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from pmnode.core.train import Pipeline


class LayerStats(BaseModel):
    layer: int
    dims90: int
    dims99: int
    in_span: float | None
    grad_norm: float
    write_stable_rank: list[float]
    write_entropy_rank: list[float]


class Diagnostics(BaseModel):
    d_model: int
    rank: int | None
    layers: list[LayerStats]


def _dims(energy: Tensor, frac: float) -> int:
    cum = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
    return int((cum < frac).sum().item()) + 1


def _ranks(w: Tensor) -> tuple[float, float]:
    s = torch.linalg.svdvals(w.detach().double())
    p = s.square() / s.square().sum().clamp_min(1e-30)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
    return round(float(s.square().sum() / s[0].square()), 2), round(math.exp(entropy), 2)


def _stream(pipe: Pipeline, tokens: Tensor, grad: bool) -> tuple[Tensor, list[Tensor]]:
    """Logits and the residual after every layer, through the codec at each stage boundary."""
    resid: list[Tensor] = []
    x: Tensor | None = None
    codec = pipe.codec
    with torch.set_grad_enabled(grad):
        for w in pipe.workers:
            st = w.stage
            if st.is_first:
                x = st.embed(tokens)
            elif x is not None:
                x = codec.lift(codec.project(x, tokens), tokens)
                x = st.add_token_features(x, tokens)
            for block in st.layers.values():
                x = block(x, st.cos, st.sin)
                resid.append(x)
        last = pipe.workers[-1].stage
        return last.lm_head(last.norm(x)), resid


def diagnose(pipe: Pipeline, batches: list[tuple[Tensor, Tensor]]) -> Diagnostics:
    sub = pipe.workers[0].stage.subspace
    energy: list[Tensor] = []
    kept: list[float] = []
    inside: list[float] = []
    for x, _ in batches:
        _, resid = _stream(pipe, x, grad=False)
        for i, r in enumerate(resid):
            r = r if sub is None else r - sub.table[x]
            flat = r.flatten(0, 1).double()  # (B*T, d)
            s2 = torch.linalg.svdvals(flat).square()
            if len(energy) <= i:
                energy.append(torch.zeros_like(s2))
                kept.append(0.0)
                inside.append(0.0)
            energy[i] += s2
            kept[i] += float(flat.square().sum())
            if sub is not None:
                inside[i] += float((flat @ sub.basis.double()).square().sum())
    x, y = batches[0]
    logits, _ = _stream(pipe, x, grad=True)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    layers = []
    blocks = [ib for w in pipe.workers for ib in w.stage.blocks()]
    for n, (i, block) in enumerate(blocks):
        grads = [p.grad.norm() ** 2 for p in block.parameters() if p.grad is not None]
        ranks = [_ranks(wr.effective_weight()) for wr in block.writes()]
        layers.append(
            LayerStats(
                layer=i,
                dims90=_dims(energy[n], 0.9),
                dims99=_dims(energy[n], 0.99),
                in_span=round(inside[n] / kept[n], 4) if sub is not None else None,
                grad_norm=round(float(torch.stack(grads).sum().sqrt()) if grads else 0.0, 5),
                write_stable_rank=[r[0] for r in ranks],
                write_entropy_rank=[r[1] for r in ranks],
            )
        )
    for w in pipe.workers:
        w.stage.zero_grad(set_to_none=True)
    return Diagnostics(
        d_model=pipe.cfg.model.d_model, rank=pipe.cfg.rank if sub is not None else None, layers=layers
    )
