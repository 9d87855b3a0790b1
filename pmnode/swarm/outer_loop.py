"""async replicas with `replica_sync.method: outer`: the loop that runs a stage's outer rounds.

Instead of hivemind's fp16 averaging of every parameter (pmnode.swarm.average_loop), every
`inner_steps` optimizer steps of its own (or as soon as another replica's share of its round comes)
a replica starts a round (pmnode.core.outer.OuterSync, on the compute thread: pmnode.swarm.
outer_jobs), pushes its compressed share to the stage's other replicas (outer_share), votes to the
round's leader until the leader decides the members (pmnode.swarm.outer_round), and applies the
members' shares in their order. Training goes on meanwhile: the result lands as a delta on the
steps taken since. A replica alone keeps its anchor at its weights (it is the stage) and pays
nothing. At the end: the round in flight, the last partial batch, then final rounds until one holds
every live replica, and every replica takes the lowest peer's weights (as average_loop does).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.core.compress import round_bytes
from pmnode.errors import PmnodeError
from pmnode.net.bulk import TransferError, unpack
from pmnode.net.meta import ShareMeta
from pmnode.net.outer_report import OuterReport
from pmnode.net.outer_rpcs import SHARE, VOTE, Decision, Vote, share_limits
from pmnode.net.services import ServeOptions, serve_all
from pmnode.net.transport import request
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.outer_jobs import OuterJobs, thread_safe_setter
from pmnode.swarm.outer_peer import OuterPeer
from pmnode.swarm.outer_round import leader_of, sample_cap
from pmnode.swarm.replicas import Replicas

POLL = 0.25  # seconds between two votes of a replica waiting for its round's decision
LINGER = 5.0  # seconds a replica keeps serving (votes, its state) after its last round
FINAL_TRIES = 4


def outer_rounds(ctx: NodeContext) -> bool:
    """Whether this node's replicas sync by outer rounds."""
    if ctx.cfg.replica_sync.method != "outer":
        return False
    # sync: each replica of a body stage steps on its own micro-batches at the commit; the heads
    # still sum theirs (their commit is the step's)
    return ctx.schedule.averages or ctx.stage > 0


class OuterLoop:
    def __init__(self, ctx: NodeContext, replicas: Replicas, downstream: Downstream):
        self.ctx, self.replicas, self.downstream = ctx, replicas, downstream
        self.cfg = ctx.cfg.replica_sync
        cap = sample_cap(ctx.cfg)
        self.peer = OuterPeer(ctx, replicas.view, [], cap, lambda: self.jobs.round)
        self.counts = self.peer.counts
        self.jobs = OuterJobs(ctx, cap, self.counts)
        self.peer.shapes = self.jobs.shapes
        self.share_bytes = round_bytes(self.jobs.shapes, self.cfg)
        self.due = asyncio.Event()
        self.stopping = asyncio.Event()  # the run is over: a sync round lands without waiting for a step
        self.peer.on_share = self._share_came
        ctx.runner.on_step = self.jobs.on_step
        replicas.extra_state, replicas.adopted = self.jobs.state, self.jobs.adopt
        replicas.before_copy = self.before_copy

    async def serve(self, opts: ServeOptions) -> None:
        """outer_share with a wire limit of one honest share; outer_vote as any JSON RPC."""
        ctx = self.ctx
        shares = dataclasses.replace(opts, limits=share_limits(self.share_bytes))
        await serve_all(ctx.tunnel, ctx.cfg.name, self.peer, (SHARE,), shares)
        await serve_all(ctx.tunnel, ctx.cfg.name, self.peer, (VOTE,), opts)

    def before_copy(self) -> None:
        """A state copy is about to be packed: it carries the shares held of this round and later."""
        r = self.jobs.round
        self.jobs.copyable = {x: dict(page) for x, page in self.peer.shares.rounds.items() if x >= r}

    def _absorb(self) -> None:
        """Shares a state copy brought (OuterJobs.adopt, on the compute thread) join the held ones."""
        got, self.jobs.inherited = self.jobs.inherited, []
        for peer, share in got:
            self.peer.shares.put(peer, share)

    def report(self) -> OuterReport:
        return self.counts.report(self.jobs.round)

    def _share_came(self, r: int) -> None:
        """Another replica started the round this one is at: start it too (rounds stay aligned)."""
        if r == self.jobs.round and not self.jobs.in_flight():
            self.due.set()

    def _due(self) -> bool:
        """Enough steps of its own, or a share of its round from another replica."""
        theirs = set(self.peer.shares.holders(self.jobs.round)) - {self.ctx.peer_id}
        return self.jobs.steps >= self.cfg.inner_steps or bool(theirs)

    async def run(self, done: asyncio.Event) -> None:
        """Rounds until the run is done (after the round in progress)."""
        await self.ctx.runner.run(self.jobs.make)
        self.jobs.due = thread_safe_setter(self.due)
        while not done.is_set():
            self._absorb()
            if self._due():  # checked after each round too: a peer's next share may have come meanwhile
                await self.one_round()
                continue
            waiters = [asyncio.ensure_future(self.due.wait()), asyncio.ensure_future(done.wait())]
            await asyncio.wait(waiters, return_when="FIRST_COMPLETED")
            for w in waiters:
                w.cancel()
            self.due.clear()

    async def one_round(self, final: bool = False) -> Decision | None:
        """One round: start, push, vote until decided, apply. None if alone."""
        ctx, runner, jobs = self.ctx, self.ctx.runner, self.jobs
        others = await self.replicas.view.my_replicas()
        if not others:
            self.counts.alone += 1
            await runner.run(jobs.rebase)
            return None
        runner.replicated = True  # the lr schedule follows the head's step, as async averaging's
        t0, r = time.monotonic(), jobs.round
        share, buf = await runner.run(jobs.timed(jobs.start))
        self.counts.bytes_per_round = int(buf.numel())
        self.peer.shares.put(ctx.peer_id, share)
        meta = ShareMeta(round=r, samples=share.samples)
        pushes = [asyncio.ensure_future(self._push(p, meta, buf)) for p in others]
        decision = await self._decide(r, final)
        for p in pushes:
            p.cancel()
        await self._settle(r, decision)
        self.counts.wall_s += time.monotonic() - t0
        self.peer.shares.drop_through(jobs.round - 1)
        return decision

    async def _settle(self, r: int, d: Decision | None) -> None:
        """Apply round r as decided: a member or an observer, the same anchor step either way."""
        ctx, runner, jobs = self.ctx, self.ctx.runner, self.jobs
        if d is None or (d.status == "decided" and not d.members):
            # nobody decided (no leader answered for long), or nobody could be a member: all abort alike
            await runner.run(jobs.abort)
            self.counts.aborted += 1
            ctx.say(f"outer round {r} aborted ({'no decision' if d is None else 'no members'})")
            return
        held = set(self.peer.shares.holders(r))
        if d.status == "gone" or not held >= set(d.members):
            await self._resync(d.members or await self.replicas.view.my_replicas(), r)
            return
        member = ctx.peer_id in d.members
        shares = self.peer.shares.take(r, d.members)
        if jobs.at_step:  # sync: in the next commit's step job, when no micro-batch is in flight
            landed = asyncio.Event()
            jobs.pending = (member, shares, thread_safe_setter(landed))
            waits = [asyncio.ensure_future(e.wait()) for e in (landed, self.stopping)]
            await asyncio.wait(waits, return_when="FIRST_COMPLETED")
            for w in waits:
                w.cancel()
            await runner.run(jobs.land)  # the run is over, no step will come: now (else a no-op)
            applied = jobs.landed_ok
        else:
            applied = await runner.run(jobs.timed(lambda: jobs.apply(member, shares)))
        if not applied:
            ctx.say(f"outer round {r}: a state copy moved this replica to round {jobs.round}; the copy holds")
            return
        if member:
            self.counts.rounds += 1
        else:
            self.counts.observed += 1
            ctx.say(f"outer round {r}: left out by the leader; applied the others' shares, progress kept")

    async def _resync(self, peers: list[str], r: int) -> None:
        """This replica cannot apply round r: it copies a member's state (anchor and round)."""
        ctx, runner = self.ctx, self.ctx.runner
        try:
            got, peer = await self.replicas.fetch_state(peers)
        except TransferError as e:
            await runner.run(self.jobs.abort)
            self.counts.aborted += 1
            ctx.say(f"outer round {r}: could not copy a member's state ({e}); its anchor may differ now")
            return
        await runner.load_state(got, keep_step=True)
        await runner.run(lambda: self.jobs.adopt(unpack(got.manifest, got.buffer), got.manifest.meta))
        self._absorb()
        self.counts.resynced += 1
        ctx.say(f"outer round {r}: lost track of the rounds; copied {peer[-8:]}'s last outer step")

    async def _push(self, peer: str, meta: ShareMeta, buf: Tensor) -> None:
        ctx, ds = self.ctx, self.downstream
        header = ctx.header("outer", meta)
        try:
            await ds.greet(peer, ctx.stage)
            await request(
                ctx.tunnel,
                peer,
                SHARE.path(ctx.cfg.name),
                header,
                Packet({"share": buf}),
                ds.stats,
                timeout=self.cfg.round_timeout,
                shaper=ds.shaper,
            )
            self.counts.bytes_sent += int(buf.numel())
        except (PmnodeError, asyncio.TimeoutError) as e:  # the leader leaves this peer or us out
            ctx.say(f"outer share of round {meta.round} to {peer[-8:]} failed: {e}")

    async def _decide(self, r: int, final: bool) -> Decision | None:
        """Vote to the round's leader until it decides (a dead leader's record expires and the next
        lowest leads); None only if no leader decided for very long."""
        ctx = self.ctx
        deadline = time.monotonic() + 4 * self.cfg.round_timeout + 30.0
        failed: set[str] = set()  # leaders that did not answer (said once)
        while time.monotonic() < deadline:
            live = await self.replicas.view.my_replicas()
            leader = leader_of(ctx.peer_id, live)
            self._absorb()
            vote = Vote(round=r, have=self.peer.shares.holders(r), final=final)
            if leader == ctx.peer_id:
                d: Decision | None = self.peer.ledger.vote(ctx.peer_id, vote, live, time.monotonic())
            else:
                try:
                    await self.downstream.greet(leader, ctx.stage)
                    d = await self.downstream.client.call(VOTE, leader, vote, timeout=5.0)
                except PmnodeError as e:  # a dead leader: its record expires and the next one leads
                    if leader not in failed:
                        ctx.say(f"outer vote of round {r} to {leader[-8:]} failed: {e}")
                    failed.add(leader)
                    d = None
            if d is not None and d.status in ("decided", "gone"):
                return d
            await asyncio.sleep(POLL)
        return None

    async def finish(self, loop_task: asyncio.Task[None] | None) -> None:
        """At the end: the round in flight, the last partial batch, final rounds until one holds every
        live replica, then every replica takes the lowest peer's weights: one set for the stage."""
        self.stopping.set()
        if loop_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop_task, 4 * self.cfg.round_timeout + 40.0)
        self.replicas.finishing = True
        await self.ctx.runner.flush_partial()
        try:
            for _ in range(FINAL_TRIES):
                d = await self.one_round(final=True)
                live = await self.replicas.view.my_replicas()
                if d is None or (d.final and set(d.members) >= {self.ctx.peer_id, *live}):
                    break
        finally:
            self.replicas.final_done.set()
        self.counts.anchor = await self.ctx.runner.run(lambda: self.jobs.digest(anchor=True))
        await self.replicas.adopt_lowest()  # a safety net: a replica that missed the last round
        self.counts.weights = await self.ctx.runner.run(self.jobs.digest)
        await asyncio.sleep(LINGER)  # the others may still vote to us, or copy our state
