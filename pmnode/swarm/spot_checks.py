"""Spot checks of compute, the head's side: of a sampled fraction of its micro-batches (trust.
spot_check_rate), it asks the stage-1 replica that served one (A) for the output it sent on, has a
second replica (B) compute that output again from the same input, and compares (spot_policy). When they
differ, a third replica (C) computes it too and decides; the replica it sides against is banned: the
head's guard bans it (the strike/ban machinery), no micro-batch and no commit includes it any more, and
the step it was caught in is computed again without it before it is applied (StepCommit).

Where outputs are comparable: under schedule sync with replica_sync.method step every replica of a stage
applies the same summed gradient, so all hold the same weights during a step, and every check of a step
finishes before the step is committed (`settle`); a replica at another step refuses to compute (not a
verdict). Under async, or with outer rounds, replicas hold different weights between rounds: checks are
off there (`enabled`). Stage 1 is the only stage whose input the head holds; the tail's output is a
loss and gradient, not an activation: a 2-stage run has nothing to check.

What a ban undoes: the current step's gradients at every stage (head included) are dropped and all its
micro-batches are sent again through honest replicas. Not undone: steps already applied (a liar caught
at step t may have bent steps before t), and, with several heads, the other heads' own stage-0 sums.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Literal

from pmnode.core.codecs import Packet
from pmnode.net.auth import Guard
from pmnode.net.envelope import MicroBatchId
from pmnode.net.meta import CheckRequest, OutputMeta
from pmnode.net.routing import choose_peer
from pmnode.net.transport import request
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.spot_policy import MAX_BANNED, Ledger, Sampler, Verdict, decide, distance
from pmnode.swarm.spot_serve import CHECK

CHECK_TIMEOUT = 30.0


def ban_now(guard: Guard, peer: str) -> None:
    """A proven liar is banned at once: one strike under a threshold of one, so the guard's own ban
    (bounded tables, ban_seconds, its count) applies; the event loop runs nothing else meanwhile."""
    limit, guard.ban_after = guard.ban_after, 1
    try:
        guard.strike(peer)
    finally:
        guard.ban_after = limit


class SpotChecker:
    def __init__(
        self, ctx: NodeContext, downstream: Downstream, guard: Guard, sampler: Sampler | None = None
    ):
        cfg = ctx.cfg
        self.ctx, self.downstream, self.guard = ctx, downstream, guard
        self.tolerance = cfg.trust.spot_check_tolerance
        self.enabled = (
            cfg.trust.spot_check_rate > 0
            and ctx.stage == 0
            and cfg.n_stages > 2  # stage 1 is not the tail
            and ctx.schedule.commits
            and cfg.replica_sync.method == "step"
        )
        self.sampler = sampler or Sampler(cfg.trust.spot_check_rate)
        self.ledger = Ledger()
        self.pending: set[asyncio.Task[Verdict]] = set()
        self.distances: list[float] = []  # A against B, for the tolerance's margin (the last 256)
        self.on_ban: Callable[[str], None] | None = None
        self.served: Counter[str] = Counter()  # micro-batches each replica served this head (bounded)
        self.served_until_ban: dict[str, int] = {}  # a liar -> micro-batches it had served at its ban

    def banned(self) -> list[str]:
        return list(self.ledger.banned)

    def start(self, mb: MicroBatchId, packet: Packet, served_by: str) -> None:
        """After micro-batch `mb` (whose wire packet was `packet`) came back from `served_by`: maybe
        check it, in the background; the step's commit waits for it (`settle`)."""
        if not self.enabled:
            return
        if served_by in self.served or len(self.served) < MAX_BANNED:
            self.served[served_by] += 1
        if not self.sampler.pick():
            return
        task = asyncio.ensure_future(self.check(mb, packet, served_by))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def settle(self) -> None:
        """Every check started so far has its verdict (before a commit counts the step)."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)

    async def _ask(
        self, peer: str, op: Literal["sent", "compute"], mb: MicroBatchId, packet: Packet
    ) -> Packet | None:
        """A replica's output for `mb` (`op` sent: what it passed on; compute: what it computes now);
        None if it cannot say, or says it of another step (its weights are not comparable)."""
        header = self.ctx.header(mb.wire, CheckRequest(op=op, at=mb.step))
        try:
            await self.downstream.greet(peer)
            reply, out = await request(
                self.ctx.tunnel,
                peer,
                CHECK.path(self.ctx.cfg.name),
                header,
                packet,
                self.downstream.stats,
                timeout=CHECK_TIMEOUT,
            )
        except Exception as e:  # a refusal, a lost replica: no opinion, never a verdict
            self.ledger.counts[f"no answer ({op})"] += 1
            self.ctx.say(f"spot check of {mb.wire}: {peer[-8:]} gave no {op} output: {e}")
            return None
        if not isinstance(reply.meta, OutputMeta) or reply.meta.at != mb.step:
            self.ledger.counts["not comparable"] += 1
            return None
        return out

    def _other(self, exclude: set[str]) -> str | None:
        skip = exclude | set(self.ledger.banned)
        r = choose_peer(self.downstream.records, exclude=skip, rng=self.downstream.rng)
        return r.peer_id if r is not None else None

    async def check(self, mb: MicroBatchId, packet: Packet, a: str) -> Verdict:
        b = self._other({a})
        if b is None:  # a stage of one replica: nothing to compare with, and nothing asked
            return self._record(mb, Verdict("skipped"))
        sent = await self._ask(a, "sent", mb, Packet({}))
        if sent is None:
            return self._record(mb, Verdict("skipped"))
        again = await self._ask(b, "compute", mb, packet)
        if again is None:
            return self._record(mb, Verdict("skipped"))
        runner = self.ctx.runner  # norms of whole activations: the compute thread's work
        d_ab = await runner.run(distance, sent, again)
        self.distances = [*self.distances[-255:], d_ab]
        if d_ab <= self.tolerance:
            return self._record(mb, decide(a, b, True))
        c = self._other({a, b})
        third = await self._ask(c, "compute", mb, packet) if c is not None else None
        if c is None or third is None:
            return self._record(mb, decide(a, b, False))
        d_ac, d_bc = await runner.run(lambda: (distance(sent, third), distance(again, third)))
        ac, bc = d_ac <= self.tolerance, d_bc <= self.tolerance
        return self._record(mb, decide(a, b, False, c, ac, bc))

    def _record(self, mb: MicroBatchId, v: Verdict) -> Verdict:
        if v.outcome == "undecided":
            names = ", ".join(p[-8:] for p in v.named)
            self.ctx.console.print(
                f"spot check of {mb.wire}: outputs differ ({names}); no majority, nobody banned"
            )
        if self.ledger.record(mb.step, v):
            assert v.liar is not None
            ban_now(self.guard, v.liar)
            self.served_until_ban[v.liar] = self.served[v.liar]
            other = next(p for p in v.named if p != v.liar)
            self.ctx.console.print(
                f"spot check of {mb.wire}: {v.liar[-8:]} and {other[-8:]} differ, a third replica sides with "
                f"{other[-8:]}: {v.liar[-8:]} is banned and step {mb.step} is computed again without it"
            )
            if self.on_ban is not None:
                self.on_ban(v.liar)
        return v

    def report(self) -> dict[str, object]:
        d = sorted(self.distances)
        return {
            "enabled": self.enabled,
            "rate": self.sampler.rate,
            "counts": dict(self.ledger.counts),
            "banned": {p: s for p, s in self.ledger.banned.items()},
            "served_until_ban": {p: n for p, n in self.served_until_ban.items() if p in self.ledger.banned},
            "events": self.ledger.events,
            "agree_distance_max": max((x for x in d if x <= self.tolerance), default=None),
        }
