"""The outer loop of a stage's replicas, in the manner of DiLoCo: one replica's side, no network.

Every replica of a stage holds the stage's agreed weights of the last outer step (the anchor θ̄) and
trains its own copy θ for `inner_steps` steps on its own micro-batches. A round then:

1. `start()`: the pseudo-gradient Δ = θ̄ − θ, plus the error-feedback residual e (e ← β·e + Δ),
   is compressed (pmnode.core.compress); what the compressor dropped stays in e. The share is sent
   to the other replicas; the replica keeps training (rounds overlap with compute).
2. `finish(shares)`: every replica takes the same shares (its own among them) in the same order, so
   every replica computes the same new anchor θ̄' = θ̄ − lr · outer(mean of the shares, weighted by
   samples), then moves its weights by θ̄' − θ_start: the inner steps it took while the round was in
   flight are kept, as a delta on top of the new anchor.

A replica that joins copies θ̄ (the stage's state as of the last outer step) as its θ. With
`compressor: none`, inner_steps 1, outer_lr 1 unscaled and no overlap this is parameter averaging.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.core.compress import Compressed, Malformed, compress, decompress, initial_q, kind_for


@dataclass
class Share:
    """What one replica sends in one round: a compressed tensor per parameter, and its sample count."""

    round: int
    samples: int
    tensors: list[Compressed]
    # decoded tensors by parameter shapes: replicas in one process (the benchmark's lanes) decode a
    # share once, not once each; the decoded tensors are read, never written
    decoded: dict[tuple[tuple[int, ...], ...], list[Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.tensors)


class OuterSync:
    """One replica's outer-loop state for a stage's trainable parameters (in a fixed order)."""

    def __init__(
        self, params: list[nn.Parameter], cfg: ReplicaSyncConfig, seed: int = 0, split_batch: bool = False
    ) -> None:
        """`split_batch`: the replicas of a round step on shares of one batch (sync), not whole ones."""
        self.params, self.cfg = params, cfg
        scale = cfg.outer_lr_scale
        self.sqrt_scale = scale == "sqrt_replicas" or (scale == "auto" and split_batch)
        self.shapes = [tuple(p.shape) for p in params]
        self.anchor = [p.detach().float().clone() for p in params]
        self.residual = [torch.zeros_like(a) for a in self.anchor] if cfg.error_feedback > 0 else None
        self.momentum = [torch.zeros_like(a) for a in self.anchor] if cfg.outer_momentum > 0 else None
        self.q_prev: dict[int, Tensor] = {
            i: initial_q(s, cfg.powersgd_rank, seed + i)
            for i, s in enumerate(self.shapes)
            if kind_for(s, cfg) == "lowrank"
        }
        self.start_weights: list[Tensor] | None = None
        self._residual_before: list[Tensor] | None = None
        self.round = 0
        self.samples = 0  # trained since the last round started
        self._samples_sent = 0  # the in-flight round's count: an aborted round gives it back

    def note_samples(self, n: int) -> None:
        self.samples += n

    @torch.no_grad()
    def start(self) -> Share:
        """Compress this replica's pseudo-gradient; remember the weights it was taken at."""
        if self.start_weights is not None:
            raise RuntimeError("a round is already in flight")
        self.start_weights = [p.detach().float().clone() for p in self.params]
        self._residual_before = [r.clone() for r in self.residual] if self.residual is not None else None
        out: list[Compressed] = []
        for i, (a, w) in enumerate(zip(self.anchor, self.start_weights, strict=True)):
            delta = a - w
            if self.residual is not None:
                delta = self.residual[i].mul_(self.cfg.error_feedback).add_(delta)
            c = compress(delta, self.cfg, self.q_prev.get(i))
            if c.kind == "lowrank":
                self.q_prev[i] = c.parts[1].float()
            if self.residual is not None:
                self.residual[i].sub_(decompress(c, self.shapes[i], self.cfg))
            out.append(c)
        share = Share(self.round, self.samples, out)
        self._samples_sent, self.samples = self.samples, 0
        return share

    def check(self, share: Share) -> list[Tensor]:
        """A peer's share as tensors; Malformed if it is not one this round can have."""
        if share.round != self.round:
            raise Malformed(f"share of round {share.round} in round {self.round}")
        if share.samples < 0:
            raise Malformed(f"negative sample count {share.samples}")
        if len(share.tensors) != len(self.shapes):
            raise Malformed(f"{len(share.tensors)} tensors where {len(self.shapes)} were due")
        key = tuple(self.shapes)
        if key not in share.decoded:
            share.decoded[key] = [
                decompress(c, s, self.cfg) for c, s in zip(share.tensors, self.shapes, strict=True)
            ]
        return share.decoded[key]

    @torch.no_grad()
    def finish(self, shares: list[Share]) -> None:
        """Apply the round from every replica's share (the same list, in the same order, everywhere)."""
        if self.start_weights is None:
            raise RuntimeError("no round in flight")
        # keep the inner steps taken while in flight; with none, every replica holds the anchor exactly
        self._outer_step(shares, self.start_weights)
        self.start_weights = None
        self.round += 1

    @torch.no_grad()
    def observe(self, shares: list[Share]) -> None:
        """Apply a round this replica is not a member of (its share came too late, or it had not
        started): the anchor moves exactly as every member's does, and all of this replica's progress
        since the old anchor stays in its weights, for its next share."""
        if self.start_weights is not None:
            self._give_back()
        self._outer_step(shares, None)
        self.round += 1

    def _outer_step(self, shares: list[Share], base: list[Tensor] | None) -> None:
        """anchor <- anchor - lr * outer(sample-weighted mean); weights keep their progress past `base`
        (None: past the old anchor)."""
        # all checked before any weight moves; shares arrive on the host, the anchor may be on a GPU
        decoded = [[t.to(a.device) for t, a in zip(self.check(s), self.anchor, strict=True)] for s in shares]
        total = sum(s.samples for s in shares)
        weights = [s.samples / total if total > 0 else 1 / len(shares) for s in shares]
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        if self.sqrt_scale:
            lr *= len(shares) ** 0.5
        for i, (a, p) in enumerate(zip(self.anchor, self.params, strict=True)):
            mean = sum(wt * d[i] for wt, d in zip(weights, decoded, strict=True))
            assert isinstance(mean, Tensor)
            if self.momentum is not None:  # Nesterov, as DiLoCo's outer optimizer
                self.momentum[i].mul_(mu).add_(mean)
                mean = mean + mu * self.momentum[i]
            new_anchor = a - lr * mean
            p.copy_(new_anchor + (p.float() - (a if base is None else base[i])))
            a.copy_(new_anchor)

    def _give_back(self) -> None:
        """The share in flight was never used: its residual and its samples count next round."""
        if self._residual_before is not None:  # what this round took out was never sent
            self.residual = self._residual_before
        self.samples += self._samples_sent  # its samples count in the next share, with its progress
        self.start_weights = None

    def abort(self) -> None:
        """A round that failed (too few replicas answered): the weights stay where training took them
        and the next round's pseudo-gradient still holds this one's progress."""
        self._give_back()
        self.round += 1

    def state(self) -> dict[str, Tensor]:
        """What a joining replica copies: the anchor is the stage's state as of the last outer step
        (with the outer momentum, which every replica must also hold alike)."""
        out = {f"anchor.{i}": a for i, a in enumerate(self.anchor)}
        if self.momentum is not None:
            out.update({f"momentum.{i}": m for i, m in enumerate(self.momentum)})
        return out

    @torch.no_grad()
    def adopt(self, state: dict[str, Tensor], round: int) -> None:
        """Become a replica at the stage's last outer step: its anchor (and momentum) as weights and
        anchor; no round in flight, no residual of its own yet."""
        for i, (a, p) in enumerate(zip(self.anchor, self.params, strict=True)):
            a.copy_(state[f"anchor.{i}"])
            p.copy_(a)
            if self.momentum is not None:
                self.momentum[i].copy_(state[f"momentum.{i}"])
        if self.residual is not None:
            for r in self.residual:
                r.zero_()
        self.start_weights, self.round, self.samples = None, round, 0
