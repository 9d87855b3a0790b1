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

from pmnode.core.compress import Malformed
from pmnode.core.outer import OuterSync, Share
from pmnode.core.share_bytes import pack_share
from pmnode.core.snapshot_meta import HeldShare, OuterState, SnapshotMeta, StateMeta
from pmnode.net.meta import ShareMeta
from pmnode.swarm.context import NodeContext
from pmnode.swarm.outer_peer import Counts, check_share
from pmnode.swarm.runner import StageRunner

T = TypeVar("T")
PREFIX = "outer/"  # the outer state's names in a state copy
SHARE = PREFIX + "share/"  # + "{round}/{peer}": a held share in a state copy (its samples in OuterState)


class OuterJobs:
    def __init__(self, ctx: NodeContext, cap: int, counts: Counts):
        self.ctx, self.cap, self.counts = ctx, cap, counts
        self.cfg = ctx.cfg.replica_sync
        self.params = [p for p in ctx.runner.worker.stage.parameters() if p.requires_grad]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sync: OuterSync | None = None  # made once the stage's weights are set (after any copy)
        self.steps = 0  # own optimizer steps since the last round started
        self.due: Callable[[], None] = lambda: None  # tells the event loop a round is due (thread-safe)
        # sync: no weights are stashed, so a round may move them only between a commit's step and the
        # next micro-batch; it waits here and lands in the step's own job (`on_step`)
        self.at_step = not ctx.schedule.averages
        self.pending: tuple[bool, list[Share], Callable[[], None]] | None = None
        self.landed_ok = True  # whether the last landing applied its round (False: a copy had passed it)
        self.copyable: dict[int, dict[str, Share]] = {}  # held shares a state copy carries (loop sets)
        self.inherited: list[tuple[str, Share]] = []  # shares a copy brought (the loop takes them)

    @property
    def outer(self) -> OuterSync:
        if self.sync is None:
            # sync replicas step on their shares of one step's micro-batches; async ones on whole batches
            split = not self.ctx.schedule.averages
            self.sync = OuterSync(self.params, self.cfg, seed=self.ctx.cfg.subspace.seed, split_batch=split)
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
        """After each optimizer step: land a round waiting for one (sync); count the step; every
        inner_steps, a round is due."""
        if self.sync is None:
            return
        self.land()
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

    def state(self) -> tuple[dict[str, Tensor], OuterState | None]:
        """What a state copy carries besides weights and optimizer: the anchor, momentum and round,
        and the shares this replica holds of that round and later ones (`copyable`, taken on the
        event loop): a copy mid-round lets the copier apply the round in flight like everyone."""
        if self.sync is None:  # no round yet: its weights are the stage's state
            return {}, None
        outer = {PREFIX + k: v for k, v in self.sync.state().items()}
        held = []
        for r, page in self.copyable.items():
            for peer, share in page.items():
                outer[f"{SHARE}{r}/{peer}"] = pack_share(share.tensors)
                held.append(HeldShare(round=r, peer=peer, samples=share.samples))
        return outer, OuterState(round=self.sync.round, shares=held)

    def adopt(self, tensors: dict[str, Tensor], meta: SnapshotMeta) -> bool:
        """A joiner, or a replica that lost track of the rounds: the copied replica's last outer step
        becomes its weights and anchor, its round this one's, and the shares it held this one's
        (`inherited`, for the event loop). False if the copy holds no outer state."""
        state = meta.outer if isinstance(meta, StateMeta) else None
        outer = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if state is None or not outer:
            return False  # a replica that never ran outer rounds: its weights are the stage's state
        round_ = state.round
        self.outer.adopt({k: v for k, v in outer.items() if not k.startswith("share/")}, round_)
        self.steps = 0
        for held in state.shares:
            name = f"{SHARE}{held.round}/{held.peer}"
            try:
                meta_ = ShareMeta(round=held.round, samples=held.samples)
                share = check_share(tensors.get(name), meta_, self.shapes, self.cfg)
            except Malformed as e:  # the copy's weights are trusted as a whole; a bad share just drops
                self.ctx.say(f"a copied outer share was unusable: {e}")
                continue
            self.inherited.append((held.peer, share))
        self.ctx.say(f"took the stage's state as of its last outer step (round {round_})")
        self.due()
        return True

    def apply(self, member: bool, shares: list[Share]) -> bool:
        """The decided round: as a member (its share among them), or as an observer. A sync catch-up
        (a state copy at a commit) may come while this replica's own round is in flight: the copy's
        anchor replaced the one the round started from. At the copy's round, the round is applied as
        an observer applies it (the same anchor step as everyone's, the weights' progress since the
        copy kept); at another round (past it, as a rule: the copied anchor holds it), the copy's anchor
        and round stand: False, nothing applied."""
        outer = self.outer
        if shares[0].round != outer.round:
            return False
        if member and outer.start_weights is not None:
            outer.finish(shares)
        else:  # left out, or a member whose round start a copy replaced
            outer.observe(shares)
        return True

    def land(self) -> None:
        """The round waiting for a step (sync), applied now."""
        if self.pending is None:
            return
        (member, shares, landed), self.pending = self.pending, None
        self.landed_ok = False
        try:
            self.landed_ok = self.timed(lambda: self.apply(member, shares))()
        finally:
            landed()  # the loop waits for this: a landing that failed must not hold it for the run

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

    def setter() -> None:
        loop.call_soon_threadsafe(event.set)

    return setter


def drop_step(runner: StageRunner, step: int) -> int:
    """Compute thread: `step`'s gradients are dropped, not applied (a batch a liar may have bent and
    nobody could clear), and the step count moves on as after any commit."""
    runner.worker.forget(step)
    return idle_step(runner)


def idle_step(runner: StageRunner) -> int:
    """Compute thread, sync with outer rounds: a replica none of whose micro-batches made the step
    makes no update (AdamW's moments alone would still move its weights), only the step count; a
    round waiting for a step lands."""
    w = runner.worker
    w.optimizer.zero_grad(set_to_none=True)
    w.samples_ready = 0
    w.step_count += 1
    if runner.on_step is not None:
        runner.on_step(0)
    return w.step_count
