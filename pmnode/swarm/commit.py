"""The sync step commit, head side: after a step's micro-batches are all back, the replicas of
every later stage sum their gradients (prepare), then all step together (apply), then the head.

A micro-batch that no live replica of some stage holds (its replica died after answering) is sent
again first; the stages that hold it already only pass it through, so every stage applies every
sample of the step exactly once. Nothing is applied until every stage is prepared, so no re-sent
micro-batch meets a stage that has already stepped. The accounting is pure (`tally`).

Several heads (pmnode.swarm.heads): the leading head prepares stage 0 too, itself in process and the
other heads over `prepare`; the step's batch is then every head's micro-batches that stage 0 holds. A
stage that holds a micro-batch of none of them (a head died after sending it) starts the step over,
and what a stage lacks is sent again by the head that owns it.

Over slow links the apply's round trip is not waited for: the head steps and sends the next step's
forwards while the replies come back; a stage holds a forward that beats its own apply until the apply
lands (StageHandler), so every forward still meets the committed weights. The next commit and every
evaluation first wait for the replies (`settle`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pmnode.data.shards import DataPosition
from pmnode.errors import PmnodeError
from pmnode.net.control import Ack, Apply, Prepare, Prepared, Reset
from pmnode.net.routing import StageRecord
from pmnode.net.rpcs import APPLY, PREPARE, RESET
from pmnode.net.services import Client
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.heads import HeadGroup
from pmnode.swarm.membership import SwarmView
from pmnode.swarm.outer_jobs import drop_step
from pmnode.swarm.participant import CommitParticipant
from pmnode.swarm.spot_checks import SpotChecker

FAILED_FOR = 10.0  # seconds a replica that failed a commit is left out of the next tries
MAX_REDOS = 5  # times one step is computed again for spot checks that found a lie


@dataclass
class StageTally:
    """One stage's answers to `prepare`: replicas lost, micro-batches held, and held twice."""

    failed: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    twice: set[str] = field(default_factory=set)


def tally(peers: list[str], replies: list[Prepared | BaseException]) -> StageTally:
    failed = {p for p, r in zip(peers, replies, strict=True) if not isinstance(r, Prepared)}
    for r in replies:
        if isinstance(r, Prepared):
            failed.update(r.unreachable)
    held = [
        mb
        for p, r in zip(peers, replies, strict=True)
        if isinstance(r, Prepared) and p not in failed
        for mb in r.own
    ]
    have = set(held)
    return StageTally(failed, have, {mb for mb in have if held.count(mb) > 1})


def live_peers(
    members: dict[int, list[str]], failed_at: dict[str, float], now: float
) -> dict[int, list[str]]:
    """Each stage's replicas minus those that failed a commit lately. Only a failed commit excludes a
    replica: one that refused micro-batches because it is behind must still get the commit that
    brings it up to date."""
    dead = {p for p, t in failed_at.items() if now - t < FAILED_FOR}
    return {s: [p for p in peers if p not in dead] for s, peers in members.items()}


class StepCommit:
    def __init__(
        self,
        ctx: NodeContext,
        view: SwarmView,
        downstream: Downstream,
        wait_whole: Callable[[], Awaitable[None]],
        heads: HeadGroup,
        local: CommitParticipant,
    ):
        self.ctx, self.view, self.downstream = ctx, view, downstream
        self.wait_whole, self.heads, self.local = wait_whole, heads, local
        self.client = Client(ctx.tunnel, ctx.cfg.name)
        self.failed_at: dict[str, float] = {}  # replica -> when a commit last failed with it
        self.reissued = 0  # micro-batches sent again after losing a replica
        self.applying: asyncio.Future[list[Any]] | None = None  # the last step's apply replies, still coming
        self.spot: SpotChecker | None = None  # the head's spot checks: liars are left out, a step redone
        self.redone: list[int] = []  # steps computed again after a spot check (a ban, or undecided)
        self.dropped: list[int] = []  # steps whose batch was dropped after MAX_REDOS undecided checks

    async def settle(self) -> None:
        """Wait for the last apply's replies: every stage has stepped (before an evaluation)."""
        if self.applying is not None:
            await self.applying
            self.applying = None

    async def commit(self, step: int, batch: list[str]) -> None:
        """Commit `step`, whose micro-batch ids are `batch` (re-sending what a lost replica held)."""
        await self.settle()
        stages = list(range(1, self.ctx.cfg.n_stages))
        deadline = time.monotonic() + self.ctx.cfg.swarm.request_timeout
        # Decided once for the step: a pass that must be re-sent after the decision does not undo it.
        drop = False
        known_liars = set(self.spot.banned()) if self.spot is not None else set()
        while True:
            if self.spot is not None:  # every check of the step has its verdict before it counts
                await self.spot.settle()
            now = time.monotonic()
            liars = set(self.spot.banned()) if self.spot is not None else set()
            members = {
                s: [r.peer_id for r in self.view.members.get(s, []) if r.peer_id not in liars] for s in stages
            }
            peers = live_peers(members, self.failed_at, now)
            empty = [s for s in stages if not peers[s]]
            if empty and self.view.empty():
                await self.wait_whole()
                deadline = time.monotonic() + self.ctx.cfg.swarm.request_timeout
                continue
            if empty:
                if now > deadline:
                    raise PmnodeError(f"stage {empty[0]} has no node to commit step {step} with")
                await asyncio.sleep(0.5)
                await self.view.refresh(empty)
                continue
            heads = self.heads.others() if self.heads.many else []
            expected, positions, failed = set(batch), self._positions(step), set[str]()
            if heads:  # stage 0 is replicated: its heads sum their gradients like any stage
                t0 = await self._prepare_heads(step, heads, positions)
                expected, failed = t0.held, set(t0.failed)
                heads = [r for r in heads if r.peer_id not in failed]
            tallies = await asyncio.gather(*(self._prepare(s, step, peers[s]) for s in stages))
            failed |= set().union(*(t.failed for t in tallies))
            missing = set().union(*(expected - t.held for t in tallies))
            for s, t in zip(stages, tallies, strict=True):
                if t.twice or t.held - expected:  # counted twice, or a micro-batch of a lost head
                    failed |= await self._reset(s, step, peers[s], len(t.twice | (t.held - expected)))
                    missing |= expected
            if self.spot is not None and self.spot.ledger.take_tainted(step):
                # a liar banned since the last pass: computing the step again without it is clean, so
                # it is always worth it (each ban takes a replica out, so this ends); only disagreements
                # nobody could decide count against MAX_REDOS
                newly_banned, known_liars = liars - known_liars, known_liars | liars
                if not drop and (newly_banned or self.redone.count(step) < MAX_REDOS):
                    failed |= await self._redo(step, stages, peers)
                    missing |= expected
                else:  # two replicas that keep disagreeing, and no third: the batch is not applied
                    drop = True
            if not failed and not missing:
                if drop:
                    self.dropped.append(step)
                    self.ctx.console.print(
                        f"step {step}: dropped after {MAX_REDOS} spot-check disagreements that no third "
                        "replica could decide; nothing of its batch is applied"
                    )
                everyone = [p for s in stages for p in peers[s]] + [r.peer_id for r in heads]
                samples = 0 if drop else len(expected) * self.ctx.cfg.train.micro
                req = Apply(step=step, samples=samples, positions=positions, drop=drop)
                await self._apply(req, everyone, local=bool(heads))
                return
            for p in failed:
                self.failed_at[p] = self.heads.failed_at[p] = time.monotonic()
            if missing:
                self.ctx.console.print(
                    f"step {step}: {len(missing)} micro-batch(es) were held only by a lost replica; "
                    "sending them again"
                )
                self.reissued += len(missing)
                await self.heads.resend(step, sorted(missing))

    async def _prepare(self, stage: int, step: int, peers: list[str]) -> StageTally:
        """Ask every replica of `stage` to sum the step's gradients."""
        timeout = self.ctx.cfg.swarm.request_timeout

        async def prepare(peer: str) -> Prepared:
            await self.downstream.greet(peer, stage)
            return await self.client.call(PREPARE, peer, Prepare(step=step, peers=peers), timeout)

        replies = await asyncio.gather(*(prepare(p) for p in peers), return_exceptions=True)
        return tally(peers, replies)

    async def _reset(self, stage: int, step: int, peers: list[str], twice: int) -> set[str]:
        """A retry met another replica than the first try: this stage's sums count it twice."""
        self.ctx.console.print(
            f"stage {stage}: step {step} holds {twice} micro-batch(es) twice after a lost "
            "replica; its replicas start the step over"
        )
        resets = [self.client.call(RESET, p, Reset(step=step)) for p in peers]
        outcome = await asyncio.gather(*resets, return_exceptions=True)
        return {p for p, r in zip(peers, outcome, strict=True) if not isinstance(r, Ack)}

    async def _redo(self, step: int, stages: list[int], peers: dict[int, list[str]]) -> set[str]:
        """A spot check banned a replica during `step`, or two disagreed with no third to decide: every
        stage (this head too) drops the step's gradients, bent by the lie wherever it went, and the whole
        batch goes again (the caller re-sends it), never through a banned replica. Steps applied before
        are not undone."""
        self.redone.append(step)
        self.ctx.console.print(f"step {step}: a spot check found a lie; the step is computed again")
        await self.downstream.refresh()  # a third replica may have come: it can decide the next check
        failed: set[str] = set()
        for s in stages:
            resets = [self.client.call(RESET, p, Reset(step=step)) for p in peers[s]]
            outcome = await asyncio.gather(*resets, return_exceptions=True)
            failed |= {p for p, r in zip(peers[s], outcome, strict=True) if not isinstance(r, Ack)}
        await self.ctx.runner.run(self.ctx.runner.worker.forget, step)
        return failed

    def _positions(self, step: int) -> dict[int, DataPosition]:
        """Every slot's data position after `step`: the last committed ones, this head's new one."""
        runner = self.ctx.runner
        positions = dict(runner.slot_positions)
        mine = runner.data_positions.get(step + 1)
        if mine is not None:
            positions[self.ctx.slot] = mine
        return positions

    async def _prepare_heads(
        self, step: int, heads: list[StageRecord], positions: dict[int, DataPosition]
    ) -> StageTally:
        """Every live head sums stage 0's gradients of the step (this one in process); the heads'
        new data positions go into `positions`."""
        me, timeout = self.ctx.peer_id, self.ctx.cfg.swarm.request_timeout
        peers = sorted([me, *(r.peer_id for r in heads)])
        req = Prepare(step=step, peers=peers)

        async def prepare(peer: str) -> Prepared:
            if peer == me:
                return await self.local.rpc_prepare(req, me)
            await self.downstream.greet(peer, 0)
            return await self.client.call(PREPARE, peer, req, timeout)

        replies = await asyncio.gather(*(prepare(p) for p in peers), return_exceptions=True)
        mine = replies[peers.index(me)]
        if isinstance(mine, BaseException):
            raise PmnodeError(f"this head could not sum stage 0's gradients of step {step}: {mine}") from mine
        slots = {r.peer_id: r.slot for r in heads}
        for p, r in zip(peers, replies, strict=True):
            if p != me and isinstance(r, Prepared) and r.ok and r.position is not None:
                positions[slots[p]] = r.position  # by the slot its certificate names, not a field
        return tally(peers, replies)

    async def _apply(self, req: Apply, everyone: list[str], local: bool) -> None:
        replies = [self.client.call(APPLY, p, req) for p in everyone]
        # One that dies now is gone; the others step. The head steps at once and its next forwards go
        # out while the replies come back: a stage holds one that beats its apply (StageHandler).
        self.applying = asyncio.ensure_future(asyncio.gather(*replies, return_exceptions=True))
        if local:  # several heads: this one applies the heads' summed gradient, as they do
            await self.local.rpc_apply(req, self.ctx.peer_id)
        else:
            self.ctx.runner.slot_positions, self.ctx.runner.positions_step = req.positions, req.step + 1
            if req.drop:
                await self.ctx.runner.run(drop_step, self.ctx.runner, req.step)
            else:
                await self.ctx.runner.step_if_ready()
