"""Several heads (swarm.heads > 1): stage 0's replicas, each driving the pipeline with its own data.

Each head holds a slot (certified by the coordinator) and reads its slot's part of the data order
(pmnode.data.shards.slot_position). Its micro-batch ids carry the slot: micro-batch j of slot h at
step t is `t:(h * n_micro + j)`, so ids never collide across heads and every replay window, pending
map and accumulated set downstream keys them apart without knowing about heads.

sync: the head that has driven longest (the earliest `driving_since` in its record, then the lowest
slot) leads each step's commit; the others send their batch, wait until it is back, and follow: the
leader prepares stage 0 like any other stage (the heads sum their gradients in peer order, as
replicas do), so every head applies the same summed gradient and their weights stay identical. A head
that joins mid-run takes no lead: it waits until a commit brings it in, then drives, and leads only
once the older heads are gone. If the leader's record goes, the next in that order commits instead.
`resend` is how the leader has another head send micro-batches of its own batch again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pmnode.errors import PmnodeError
from pmnode.net.control import Ack, Resend
from pmnode.net.envelope import MicroBatchId
from pmnode.net.routing import StageRecord
from pmnode.net.rpcs import RESEND
from pmnode.net.services import Client
from pmnode.swarm.context import NodeContext
from pmnode.swarm.membership import SwarmView

RPCS = (RESEND,)
FAILED_FOR = 10.0  # seconds a head that failed a commit is left out (as commit.FAILED_FOR)


def slot_ids(step: int, slot: int, n_micro: int) -> list[str]:
    """The micro-batch ids of one head's batch of `step`."""
    return [MicroBatchId(step, slot * n_micro + j).wire for j in range(n_micro)]


def slot_of(wire: str, n_micro: int) -> int:
    """The head slot a micro-batch id belongs to."""
    return int(wire.split(":")[1]) // n_micro


class HeadGroup:
    """This head's view of the other heads, its part in their commits, and the `resend` RPC."""

    def __init__(self, ctx: NodeContext, view: SwarmView):
        self.ctx, self.view = ctx, view
        t = ctx.cfg.train
        self.n_micro = t.batch_size // t.micro
        self.client = Client(ctx.tunnel, ctx.cfg.name)
        self.resend_own: Callable[[list[str]], Awaitable[None]] | None = None  # set by the driver
        # Whether this head sends a batch every step (not while a commit has yet to bring it in), and
        # the last step whose batch is all back: another head's commit waits for it (`ready`).
        self.driving = True
        self.drained_step = -1
        self.since: int | None = None  # the step this head began driving at (announced: leadership)
        self.moved = asyncio.Condition()
        self.failed_at: dict[str, float] = {}

    @property
    def many(self) -> bool:
        return self.ctx.cfg.swarm.heads > 1

    def others(self) -> list[StageRecord]:
        """The other online heads, minus those that failed a commit lately, by slot."""
        now = time.monotonic()
        recs = [
            r
            for r in self.view.members.get(0, [])
            if r.peer_id != self.ctx.peer_id
            and r.state == "online"
            and now - self.failed_at.get(r.peer_id, -1e9) >= FAILED_FOR
        ]
        return sorted(recs, key=lambda r: r.slot)

    def leads(self) -> bool:
        """Whether this head leads the commit (and evaluates): of the heads that drive, the one that
        began earliest, then the lowest slot. Every head computes the same from the records, and a
        joiner never takes the lead from the heads it joins."""
        never = 2**62
        mine = (self.since if self.since is not None else never, self.ctx.slot)
        theirs = [(r.driving_since, r.slot) for r in self.others() if r.driving_since is not None]
        return all(mine < t for t in theirs)

    def ahead(self) -> int | None:
        """The step of the furthest other head, if it is past this one's (a head joining mid-run)."""
        steps = [r.step for r in self.others()]
        best = max(steps, default=None)
        return best if best is not None and best > self.ctx.runner.step else None

    # ---- this head's batch in flight ------------------------------------------------------------
    async def set_driving(self, driving: bool) -> None:
        async with self.moved:
            self.driving = driving
            self.moved.notify_all()

    def waiting(self) -> bool:
        """A head that joined mid-run and waits for the commit that brings it in: it sends nothing."""
        return not self.driving and self.since is None

    async def drained(self, step: int) -> None:
        async with self.moved:
            self.drained_step = step
            self.moved.notify_all()

    async def ready(self, step: int) -> None:
        """Before this head's gradients of `step` are summed or sent to another head: its whole batch
        of `step` is back (a head that drives sends one every step; it may not have started it yet)."""
        with contextlib.suppress(TimeoutError):
            async with self.moved:
                done = lambda: not self.driving or self.drained_step >= step  # noqa: E731
                await asyncio.wait_for(self.moved.wait_for(done), self.ctx.cfg.swarm.request_timeout)

    async def wait_for_all(self) -> None:
        """At the start: every slot's head, announced as driving, for a while. Then step 0 has every
        batch, and every head sees the same leader from the first commit on."""
        deadline = time.monotonic() + self.ctx.cfg.swarm.request_timeout
        said = False

        def driving() -> list[StageRecord]:
            return [r for r in self.others() if r.driving_since is not None]

        while len(driving()) + 1 < self.ctx.cfg.swarm.heads and time.monotonic() < deadline:
            if not said:
                self.ctx.console.print(f"waiting for the run's {self.ctx.cfg.swarm.heads} heads...")
                said = True
            await asyncio.sleep(1.0)
            await self.view.refresh([0])

    # ---- resend ---------------------------------------------------------------------------------
    async def rpc_resend(self, req: Resend, caller: str) -> Ack:
        """The leading head lost a replica that held some of this head's micro-batches."""
        if req.step != self.ctx.runner.step:
            raise PmnodeError(f"this head is at step {self.ctx.runner.step}, not {req.step}")
        if any(slot_of(i, self.n_micro) != self.ctx.slot for i in req.ids):
            raise PmnodeError(f"micro-batches {req.ids[:3]} are not of slot {self.ctx.slot}")
        if self.resend_own is None:
            raise PmnodeError("this head is not driving")
        await self.resend_own(req.ids)
        return Ack()

    async def resend(self, step: int, ids: list[str]) -> None:
        """Have the owner of each micro-batch send it again (this head's own, in process)."""
        mine = [i for i in ids if slot_of(i, self.n_micro) == self.ctx.slot]
        by_slot = {r.slot: r.peer_id for r in self.others()}
        calls: list[Awaitable[Any]] = []
        for slot in sorted({slot_of(i, self.n_micro) for i in ids} - {self.ctx.slot}):
            theirs = [i for i in ids if slot_of(i, self.n_micro) == slot]
            if slot in by_slot:
                req = Resend(step=step, ids=theirs)
                calls.append(self.client.call(RESEND, by_slot[slot], req, self.ctx.cfg.swarm.request_timeout))
        if mine and self.resend_own is not None:
            calls.append(self.resend_own(mine))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                self.ctx.say(f"a head could not send its micro-batches again: {outcome}")
