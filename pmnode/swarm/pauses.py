"""The head's pauses: while some stage has no node at all, training waits (one message, every
micro-batch sharing one pause) and goes on when a node joins; swarm.pause_limit stops it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pmnode.errors import PmnodeError
from pmnode.net.routing import HEARTBEAT_PERIOD, RECORD_TTL
from pmnode.swarm.context import NodeContext
from pmnode.swarm.membership import SwarmView

SAY_EVERY = 30.0  # seconds between "training paused" messages


@dataclass
class PauseClock:
    """Pure decisions of one pause: when to say so, when to give up."""

    started: float
    limit: float  # seconds; 0: for ever
    said: float = -1e9

    def should_say(self, now: float) -> bool:
        if now - self.said >= SAY_EVERY:
            self.said = now
            return True
        return False

    def exceeded(self, now: float) -> bool:
        return bool(self.limit) and now - self.started > self.limit


class Pauses:
    def __init__(self, ctx: NodeContext, view: SwarmView, on_resume: Callable[[], Awaitable[None]]):
        self.ctx, self.view, self.on_resume = ctx, view, on_resume
        self.lock = asyncio.Lock()  # every waiting micro-batch shares one pause and one message
        self.paused_s = 0.0

    async def stage_went_empty(self) -> bool:
        """After a failed micro-batch: did a whole stage go? Its last record outlives it by RECORD_TTL."""
        deadline = time.monotonic() + RECORD_TTL + HEARTBEAT_PERIOD
        while True:
            await self.view.refresh()
            if self.view.empty():
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(HEARTBEAT_PERIOD)

    async def wait_whole(self) -> None:
        """Pause while some stage has no node; go on when one joins (the coordinator sends new nodes
        to empty stages first)."""
        if not self.view.empty():
            return
        async with self.lock:
            empty = self.view.empty()
            if not empty:
                return
            clock = PauseClock(time.monotonic(), self.ctx.cfg.swarm.pause_limit)
            while empty:
                now = time.monotonic()
                if clock.should_say(now):
                    self.ctx.console.print(
                        f"training paused at step {self.ctx.runner.step}: stage "
                        f"{', '.join(map(str, empty))} has no node; it resumes when one joins "
                        f"(pmnode join --stage {empty[0]} ...)",
                        highlight=False,
                    )
                if clock.exceeded(now):
                    raise PmnodeError(
                        f"stage {empty[0]} had no node for {clock.limit:.0f}s (swarm.pause_limit); stopping"
                    )
                await asyncio.sleep(1.0)
                await self.view.refresh()
                empty = self.view.empty()
            waited = time.monotonic() - clock.started
            self.paused_s += waited
            await self.on_resume()
            self.ctx.console.print(
                f"every stage has a node again: training resumes at step {self.ctx.runner.step} "
                f"after {waited:.1f}s",
                highlight=False,
            )
