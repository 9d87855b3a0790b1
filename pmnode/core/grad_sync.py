"""replica_sync.method grads, computed in one process: R replicas that each send their gradient sums
compressed every step, and step one optimizer each on the same decoded total.

Every replica holds the same weights and optimizer state (they apply the same total), so one pipeline
stands for all of them: it computes each replica's share of the batch in turn (the replica's 1/R of the
micro-batches), takes that replica's gradient sums, compresses them with the replica's own error
feedback (the residual the compressor left, decayed by `error_feedback`), and adds the decoded share to
the step's total. The optimizer then steps once on the total of every replica's decoded share: what a
swarm's replicas would each compute from the same shares. With `compressor: none` this is the exact path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmnode.config import ReplicaSyncConfig
from pmnode.core.compress import compress, decompress, initial_q, kind_for


class GradShares:
    """One replica's compressor state for one stage's trainable parameters (error feedback, PowerSGD's Q)."""

    def __init__(self, params: list[nn.Parameter], cfg: ReplicaSyncConfig, seed: int) -> None:
        self.params, self.cfg = params, cfg
        self.shapes = [tuple(p.shape) for p in params]
        self.residual = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.q_prev: dict[int, Tensor] = {
            i: initial_q(s, cfg.powersgd_rank, seed + i)
            for i, s in enumerate(self.shapes)
            if kind_for(s, cfg) == "lowrank"
        }

    @torch.no_grad()
    def share(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """This replica's gradient sums as the others decode them; the rest stays in its residual.
        A parameter without gradients sends none (every replica's is None alike: the same graph)."""
        out: list[Tensor | None] = []
        for i, g in enumerate(grads):
            if g is None:
                out.append(None)
                continue
            if self.cfg.compressor == "none":
                out.append(g.float().clone())
                continue
            t = self.residual[i].mul_(self.cfg.error_feedback).add_(g.float())
            c = compress(t, self.cfg, self.q_prev.get(i))
            if c.kind == "lowrank":
                self.q_prev[i] = c.parts[1].float()
            decoded = decompress(c, self.shapes[i], self.cfg)
            self.residual[i].sub_(decoded)
            out.append(decoded)
        return out


def take_grads(params: list[nn.Parameter]) -> list[Tensor | None]:
    """The gradient sums accumulated so far (None where a parameter got none: AdamW then leaves it
    alone, as the single pipeline does), cleared for the next replica's share."""
    grads = []
    for p in params:
        grads.append(p.grad)
        p.grad = None
    return grads
