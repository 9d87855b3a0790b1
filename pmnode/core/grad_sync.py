"""replica_sync.method grads: each replica's gradient sums of a step travel compressed, with error
feedback, and every replica steps its optimizer on the same decoded total.

One replica's compressor state is its error-feedback residual (what the compressor left of its past
sums, decayed by `error_feedback`) and PowerSGD's warm-start Q. `ef_share` is one tensor's step of it.
Two users:

- `GradShares`, the convergence bench's replicas in one process (pmnode.core.replica_train): one
  pipeline stands for every replica (they hold the same weights, having applied the same totals), so it
  computes each replica's share of the batch in turn and adds that replica's decoded share to the total.
- `GradCompressor`, a swarm replica's (pmnode.swarm.participant): the stage's flat gradient vector in,
  the share's bytes (pmnode.core.share_bytes, the outer rounds' format) and the decoded vector out; the
  other replicas' bytes decoded and checked. A step's share is computed once per distinct sum: asked
  again for the same step and the same sums (its own prepare, each peer's fetch) it is the same bytes;
  asked for a step whose sums changed (micro-batches sent again) the residual is first put back as it was
  before the step, so the error feedback counts each step's sums once.

With `compressor: none` the share is the sum itself and this is the exact path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pmnode.config import ReplicaSyncConfig
from pmnode.core.compress import Compressed, compress, decompress, initial_q, kind_for, round_bytes
from pmnode.core.share_bytes import pack_share, unpack_share


def ef_share(
    g: Tensor,
    residual: Tensor,
    cfg: ReplicaSyncConfig,
    shape: tuple[int, ...],
    q_prev: dict[int, Tensor],
    i: int,
) -> tuple[Tensor, Compressed]:
    """One tensor's share: (decoded, what is sent). `residual` (fp32, like g) takes what the compressor
    left; `q_prev[i]` (PowerSGD) moves on."""
    t = residual.mul_(cfg.error_feedback).add_(g.float().reshape(shape))
    c = compress(t, cfg, q_prev.get(i))
    if c.kind == "lowrank":
        q_prev[i] = c.parts[1].float()
    decoded = decompress(c, shape, cfg)
    residual.sub_(decoded)
    return decoded, c


class GradShares:
    """One replica's compressor state for one stage's trainable parameters (the convergence bench)."""

    def __init__(self, params: list[nn.Parameter], cfg: ReplicaSyncConfig, seed: int) -> None:
        self.params, self.cfg = params, cfg
        self.shapes = [tuple(p.shape) for p in params]
        self.residual = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.q_prev = _initial_qs(self.shapes, cfg, seed)

    @torch.no_grad()
    def share(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """This replica's gradient sums as the others decode them; the rest stays in its residual.
        A parameter without gradients sends none (every replica's is None alike: the same graph)."""
        out: list[Tensor | None] = []
        for i, g in enumerate(grads):
            if g is None or self.cfg.compressor == "none":
                out.append(None if g is None else g.float().clone())
                continue
            out.append(ef_share(g, self.residual[i], self.cfg, self.shapes[i], self.q_prev, i)[0])
        return out


def take_grads(params: list[nn.Parameter]) -> list[Tensor | None]:
    """The gradient sums accumulated so far (None where a parameter got none: AdamW then leaves it
    alone, as the single pipeline does), cleared for the next replica's share."""
    grads = []
    for p in params:
        grads.append(p.grad)
        p.grad = None
    return grads


def _initial_qs(shapes: list[tuple[int, ...]], cfg: ReplicaSyncConfig, seed: int) -> dict[int, Tensor]:
    return {
        i: initial_q(s, cfg.powersgd_rank, seed + i)
        for i, s in enumerate(shapes)
        if kind_for(s, cfg) == "lowrank"
    }


@dataclass
class _Memo:
    step: int
    sums: Tensor  # the flat sums the share was made from
    residual_before: list[Tensor]
    q_before: dict[int, Tensor]
    buf: Tensor
    decoded: Tensor


class GradCompressor:
    """A swarm replica's side of method grads, for its stage's parameters (flat, in parameter order).
    Compute thread only: it holds tensors."""

    def __init__(self, shapes: list[tuple[int, ...]], cfg: ReplicaSyncConfig, seed: int) -> None:
        self.shapes, self.cfg = shapes, cfg
        self.sizes = [math.prod(s) for s in shapes]
        self.residual = [torch.zeros(s) for s in shapes]
        self.q_prev = _initial_qs(shapes, cfg, seed)
        self.nbytes = round_bytes(shapes, cfg)  # what one share is, exactly
        self.memo: _Memo | None = None

    @torch.no_grad()
    def share(self, step: int, sums: Tensor) -> tuple[Tensor, Tensor]:
        """(the share's bytes, its decoded flat vector) for this step's flat `sums`."""
        m = self.memo
        if m is not None and m.step == step:
            if torch.equal(m.sums, sums):
                return m.buf, m.decoded
            self.residual, self.q_prev = m.residual_before, m.q_before  # the step's sums changed
        before = [r.clone() for r in self.residual]
        q_before = dict(self.q_prev)
        parts: list[Compressed] = []
        decoded: list[Tensor] = []
        for i, (g, shape) in enumerate(zip(sums.split(self.sizes), self.shapes, strict=True)):
            d, p = ef_share(g, self.residual[i], self.cfg, shape, self.q_prev, i)
            decoded.append(d.reshape(-1))
            parts.append(p)
        buf = pack_share(parts)
        flat = torch.cat(decoded) if decoded else sums.new_zeros(0)
        self.memo = _Memo(step, sums.clone(), before, q_before, buf, flat)
        return buf, flat

    def forget(self, step: int) -> None:
        """`step` is dropped, not applied: its sums never count, in the residual either."""
        m = self.memo
        if m is not None and m.step == step:
            self.residual, self.q_prev, self.memo = m.residual_before, m.q_before, None

    def zeros(self) -> Tensor:
        """The bytes of an all-zero share (a head still joining adds nothing); no residual touched."""
        return pack_share(
            [compress(torch.zeros(s), self.cfg, self.q_prev.get(i)) for i, s in enumerate(self.shapes)]
        )

    @torch.no_grad()
    def decode(self, buf: Tensor) -> Tensor:
        """Another replica's share as a flat vector; Malformed if it cannot be one (size, shapes,
        values, indices: pmnode.core.compress checks each)."""
        tensors = unpack_share(buf, self.shapes, self.cfg)
        out = [decompress(c, s, self.cfg).reshape(-1) for c, s in zip(tensors, self.shapes, strict=True)]
        return torch.cat(out) if out else torch.zeros(0)
