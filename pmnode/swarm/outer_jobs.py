"""The compute-thread side of outer rounds: one replica's OuterSync and every job that touches it.

Every method here runs as a job on the stage's compute thread (StageRunner.run), or is called from
one (`on_step`, from the step itself): the event loop only schedules them (pmnode.swarm.outer_loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from pmnode.core.outer import OuterSync, Share
from pmnode.core.share_bytes import pack_share
from pmnode.errors import PmnodeError
from pmnode.swarm.context import NodeContext
from pmnode.swarm.outer_peer import Counts

T = TypeVar("T")
PREFIX = "outer/"  # the outer state's names in a state copy


class OuterJobs:
    def __init__(self, ctx: NodeContext, cap: int, counts: Counts):
        self.ctx, self.cap, self.counts = ctx, cap, counts
        self.cfg = ctx.cfg.replica_sync
        self.params = [p for p in ctx.runner.worker.stage.parameters() if p.requires_grad]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sync: OuterSync | None = None  # made once the stage's weights are set (after any copy)
        self.steps = 0  # own optimizer steps since the last round started
        self.due: Callable[[], None] = lambda: None  # tells the event loop a round is due (thread-safe)

    @property
    def outer(self) -> OuterSync:
        if self.sync is None:
            self.sync = OuterSync(self.params, self.cfg, seed=self.ctx.cfg.subspace.seed)
        return self.sync

    @property
    def round(self) -> int:
        return self.sync.round if self.sync is not None else 0

    def in_flight(self) -> bool:
        return self.sync is not None and self.sync.start_weights is not None

    def timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        """A job whose time counts as round work: what training waited for."""

        def job() -> T:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.counts.blocked_s += time.perf_counter() - t0

        return job

    def make(self) -> None:
        _ = self.outer

    def on_step(self, applied: int) -> None:
        """After each optimizer step: count it; every inner_steps, a round is due."""
        if self.sync is None:
            return
        self.sync.note_samples(applied)
        self.steps += 1
        if self.steps >= self.cfg.inner_steps:
            self.due()

    def start(self) -> tuple[Share, Tensor]:
        """The share of the round this replica is at, and its bytes. An honest replica never claims
        more samples than a share may (progress carried over left-out rounds can exceed it)."""
        self.steps = 0
        share = self.outer.start()
        share = dataclasses.replace(share, samples=min(share.samples, self.cap))
        return share, pack_share(share.tensors)

    def rebase(self) -> None:
        """Alone: this replica is the stage, so its weights are the stage's state (a joiner copies it)."""
        self.steps, sync = 0, self.outer
        with torch.no_grad():
            for a, p in zip(sync.anchor, self.params, strict=True):
                a.copy_(p.detach().float())
        if sync.residual is not None:
            for r in sync.residual:
                r.zero_()

    def state(self) -> tuple[dict[str, Tensor], dict[str, int | str]]:
        """What a state copy carries besides weights and optimizer: the anchor, momentum and round."""
        if self.sync is None:  # no round yet: its weights are the stage's state
            return {}, {}
        if self.sync.start_weights is not None:
            raise PmnodeError("an outer round is in flight here; its anchor is about to change")
        outer = {PREFIX + k: v for k, v in self.sync.state().items()}
        return outer, {"outer_round": self.sync.round}

    def adopt(self, tensors: dict[str, Tensor], meta: dict[str, int | str]) -> bool:
        """A joiner, or a replica that lost track of the rounds: the copied replica's last outer step
        becomes its weights and anchor, and its round this one's. False if the copy holds none."""
        round_ = meta.get("outer_round")
        outer = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if not isinstance(round_, int) or not outer:
            return False  # a replica that never ran outer rounds: its weights are the stage's state
        self.outer.adopt(outer, round_)
        self.steps = 0
        self.ctx.say(f"took the stage's state as of its last outer step (round {round_})")
        return True

    def apply(self, member: bool, shares: list[Share]) -> None:
        """The decided round: as a member (its share among them), or as an observer."""
        if member:
            self.outer.finish(shares)
        else:
            self.outer.observe(shares)

    def abort(self) -> None:
        self.outer.abort()

    def digest(self, anchor: bool = False) -> str:
        """The stage's weights (or the anchor), hashed: replicas that agree show the same."""
        h = hashlib.sha256()
        for t in self.outer.anchor if anchor else self.params:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def thread_safe_setter(event: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon_threadsafe(event.set)
