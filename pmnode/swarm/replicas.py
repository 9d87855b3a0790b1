"""Replica state: a stage's weights travel between its replicas, and an empty stage is taken over.

state        serve this replica's weights, optimizer state and step to another replica, in chunks
             (pmnode.net.bulk: any size, checksummed; a copy resumes with another replica if one dies),
             with a digest this replica signs (pmnode.net.state_digest): every copy is checked against
             its source's signature, and never taken from a peer this node's guard has banned
catch_up     sync: a replica behind the head's commit loads a live replica's state
copy         async: a joiner starts from a live replica before serving
adopt        nobody serves the stage: take it over from its checkpoint at the swarm's step
adopt_lowest async, at the end: every replica takes the lowest peer's final weights
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from torch import Tensor

from pmnode.core import checkpoint
from pmnode.core.codecs import Packet
from pmnode.core.replica_state import max_state_bytes, state_tensors
from pmnode.core.snapshot_meta import OuterState, SnapshotMeta, StateMeta
from pmnode.errors import PmnodeError
from pmnode.net.auth import Guard
from pmnode.net.bulk import BulkServer, Received, Snapshot, TransferError, fetch, pack, unpack
from pmnode.net.callproof import Identity
from pmnode.net.meta import BulkChunk, BulkClose, BulkOpen, BulkRequest
from pmnode.net.relay import connect_known
from pmnode.net.rpcs import STATE
from pmnode.net.state_digest import SIGNED, StateCheck, vouch
from pmnode.net.wire import MessageHeader, WireError
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.membership import SwarmView
from pmnode.swarm.options import NodeOptions

FINAL_WAIT = 60.0  # seconds a state request waits for this replica's last averaging round


class Replicas:
    def __init__(
        self,
        ctx: NodeContext,
        opts: NodeOptions,
        view: SwarmView,
        downstream: Downstream,
        *,
        identity: Identity,
        guard: Guard,
    ):
        self.ctx, self.opts, self.view, self.downstream = ctx, opts, view, downstream
        self.identity = identity  # signs the digest of every state this replica serves
        self.guard = guard  # whom this node banned is never copied from; a bad copy is a strike
        self.origin: str | None = None  # where this stage's weights came from, when not random init
        self.rejoined = False  # took over an empty stage mid-run: its first step re-sends everything
        self.steps_lost = 0  # swarm steps whose updates this stage's weights never saw (empty stage)
        self.finishing = False  # async: in the last averaging round
        self.final_done = asyncio.Event()  # async: the last round is over
        self.bulk = BulkServer(ctx.runner.run)
        self.route: Callable[[], Awaitable[None]] | None = None  # fresh relay routes (Parts.update_routes)
        # outer replica rounds (pmnode.swarm.outer_loop): what a state copy carries besides weights and
        # optimizer (compute thread), and what a joiner does with it after loading (compute thread)
        self.extra_state: Callable[[], tuple[dict[str, Tensor], OuterState | None]] | None = None
        self.adopted: Callable[[dict[str, Tensor], SnapshotMeta], object] | None = None
        self.before_copy: Callable[[], None] | None = None  # outer rounds: which shares go with a copy

    async def rpc_state(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        """A replica of our stage downloads our weights and optimizer state (open, then chunks)."""
        req, runner = header.meta, self.ctx.runner
        if not isinstance(req, (BulkOpen, BulkChunk, BulkClose)):
            raise WireError("bad payload", f"a {header.kind} message, not a bulk request")
        if isinstance(req, BulkOpen):
            if self.finishing:  # async, at the end: what the others take is the result of our last round
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.final_done.wait(), FINAL_WAIT)
            if self.before_copy is not None:  # on this loop: the outer shares it holds, for the copy
                self.before_copy()
            if req.step is not None and req.step != runner.step:
                raise TransferError(f"this replica is at step {runner.step}, not {req.step}")
        pkt = await self.bulk.answer(req, self._snapshot)
        return self.ctx.header(header.micro_batch), pkt

    def _snapshot(self) -> Snapshot:
        """Compute thread: this replica's state, packed for a copy."""
        tensors, meta = state_tensors(self.ctx.runner.worker)
        if self.extra_state is not None:
            more, outer = self.extra_state()
            tensors, meta = {**tensors, **more}, meta.model_copy(update={"outer": outer})
        snap = pack(tensors, meta)
        ctx = self.ctx
        signed = vouch(
            self.identity, run=ctx.cfg.name, stage=ctx.stage, source=ctx.peer_id, manifest=snap.manifest
        )
        snap.extra[SIGNED] = signed.model_dump_json().encode()
        return snap

    def allowed(self, peers: list[str]) -> list[str]:
        """`peers` less those this node's guard has banned (a liar's or a poisoner's state is not copied)."""
        return [p for p in peers if not self.guard.is_banned(p)]

    def _refused(self, peer: str, reason: str) -> None:
        """A copy refused for what its sender vouched for: counted with the node's refusals, a strike."""
        self.guard.rejected[reason] += 1
        banned = self.guard.strike(peer)
        self.ctx.say(f"state copy from {peer[-8:]} refused: {reason}" + (" (banned)" if banned else ""))

    async def fetch_state(self, peers: list[str], at_step: int | None = None) -> tuple[Received, str]:
        """A live replica's state from the first of `peers` that completes it (at `at_step` if given),
        signed by it; banned peers are skipped."""
        ctx = self.ctx
        allowed = self.allowed(peers)
        if not allowed:
            raise TransferError(f"no replica to copy from: {len(peers)} named, every one banned here")
        if self.route is not None:  # a relayed replica just announced: through its relay's forwarder
            await self.route()
        await connect_known(self.ctx.p2p, await self.view.records(self.ctx.stage))  # relayed replicas
        done: list[str] = []

        async def ask(peer: str, req: BulkRequest) -> Packet:
            done[:] = [peer]
            header = self.ctx.header("state", req)
            return (await self.downstream.ask_replica(STATE, peer, header))[1]

        size = max_state_bytes(ctx.runner.worker)  # a sender may not make us allocate more
        check = StateCheck(
            ctx.verifier, ctx.cfg.name, ctx.stage, self.downstream.greeted.get, at_step, self._refused
        )
        got = await fetch(
            ask, allowed, BulkOpen(step=at_step), StateMeta, say=ctx.say, max_size=size, check=check
        )
        return got, done[0]

    async def catch_up(self, step: int, peers: list[str]) -> None:
        """Load a live replica's state (weights, optimizer, step): never serve from a stale or random one."""
        ctx = self.ctx
        if not peers:  # no other replica: this node is the stage now, from its checkpoint
            await self.adopt(step)
            return
        try:
            got, peer = await self.fetch_state(peers, at_step=step)
        except TransferError as e:
            raise PmnodeError(f"stage {ctx.stage}: no replica at step {step} to catch up from ({e})") from e
        await ctx.runner.load_state(got, at_step=step)  # a copy of another step is refused, not loaded
        if self.adopted is not None:  # sync with outer rounds: the copy's last outer step, too
            adopted = self.adopted
            await ctx.runner.run(lambda: adopted(unpack(got.manifest, got.buffer), got.manifest.meta))
        else:  # the step method: every replica applies every head's batch at each step's commit
            ctx.runner.samples_applied = step * ctx.runner.batch
        # With outer rounds each replica steps on its own micro-batches only: the samples in the weights
        # it copied were counted by the replica that applied them, so this one's count stays its own.
        ctx.console.print(f"stage {ctx.stage}: caught up to step {step} from {peer[-8:]}")

    async def copy(self, peers: list[str]) -> None:
        """async: start from a live replica's weights, optimizer state and step, before serving; if
        every replica fails mid-copy, from this stage's checkpoint."""
        ctx, runner, o = self.ctx, self.ctx.runner, self.opts
        try:
            got, peer = await self._fetch_patiently(peers)
        except TransferError as e:
            man = checkpoint.load_manifest(o.checkpoint_dir, ctx.stage) if o.checkpoint_dir else None
            if o.checkpoint_dir is None or man is None or man.run != ctx.cfg.name:
                raise PmnodeError(
                    f"stage {ctx.stage}: no replica completed a copy of its state ({e}); this node will "
                    "not serve from random weights: try again, or pass --checkpoint-dir with this stage's"
                ) from e
            man = await runner.load(o.checkpoint_dir)
            self.origin = f"its checkpoint of step {man.step} in {o.checkpoint_dir}"
            runner.samples_applied, runner.frontier, runner.replicated = 0, man.step, True
            ctx.console.print(f"stage {ctx.stage}: no replica completed a copy; serving from {self.origin}")
            return
        await runner.load_state(got)
        if self.adopted is not None:
            adopted = self.adopted
            await runner.run(lambda: adopted(unpack(got.manifest, got.buffer), got.manifest.meta))
        step = runner.step
        runner.samples_applied, runner.frontier, runner.replicated = 0, step, True
        self.origin = f"replica {peer[-8:]} at step {step}"
        extra = f" (resumed {got.resumed}x after a sender failed)" if got.resumed else ""
        ctx.console.print(f"stage {ctx.stage}: copied replica {peer[-8:]} at step {step}{extra}")

    async def _fetch_patiently(self, peers: list[str], tries: int = 3) -> tuple[Received, str]:
        """fetch_state, tried again after a pause: a relayed replica's circuit may not be up yet, and
        libp2p backs off dialing an address that just failed."""
        for i in range(tries):
            try:
                return await self.fetch_state(peers)
            except TransferError:
                if i == tries - 1:
                    raise
                await asyncio.sleep(5.0)
        raise AssertionError("unreachable")

    async def take_over_if_empty(self) -> None:
        """Joining a stage that no node serves while the swarm is past step 0: never from random init."""
        others = await self.view.my_replicas()
        if others and self.ctx.schedule.averages:
            await self.copy(others)
        if others:
            return  # sync: the head's next commit brings it up to date from them
        step = await self.view.swarm_step()
        if step > self.ctx.runner.step:
            await self.adopt(step)

    async def resume(self) -> None:
        """--resume: this stage's own checkpoint, or one clear line."""
        o, stage = self.opts, self.ctx.stage
        if not (o.checkpoint_dir and checkpoint.load_manifest(o.checkpoint_dir, stage)):
            raise PmnodeError(
                f"--resume: no checkpoint of stage {stage} under {o.checkpoint_dir}; "
                "drop --resume to start this stage fresh"
            )
        man = await self.ctx.runner.load(o.checkpoint_dir)
        self.origin = f"its checkpoint of step {man.step} in {o.checkpoint_dir}"
        self.ctx.console.print(f"resumed stage {stage} from step {man.step}")

    async def adopt(self, step: int) -> None:
        """Serve an empty stage from its latest checkpoint, then move to the swarm's step.

        The updates the stage made after that checkpoint died with its last node; the other stages
        keep theirs, so the swarm goes on at `step` and this stage counts the steps it lost.
        """
        o, s, runner = self.opts, self.ctx.stage, self.ctx.runner
        if self.origin is None:
            man = checkpoint.load_manifest(o.checkpoint_dir, s) if o.checkpoint_dir else None
            if o.checkpoint_dir and man is not None and man.run == self.ctx.cfg.name and man.step <= step:
                man = await runner.load(o.checkpoint_dir)
                self.origin = f"its checkpoint of step {man.step} in {o.checkpoint_dir}"
            elif o.fresh_weights:
                self.origin = "random weights (--fresh-weights)"
            else:
                found = f" (the one there is of step {man.step} or another run)" if man else ""
                raise PmnodeError(
                    f"stage {s} has no node and the swarm is at step {step}: pass --checkpoint-dir DIR "
                    f"holding this run's stage-{s}/ checkpoint{found}, or --fresh-weights to start the stage "
                    "from random weights"
                )
        lost = step - runner.step
        await runner.move_to(step)
        self.steps_lost += lost
        self.rejoined = True
        self.ctx.console.print(
            f"stage {s} had no node: serving from {self.origin}; the swarm is at step {step}, so this "
            f"stage skips the updates of {lost} step(s)",
            highlight=False,
            markup=False,
        )

    async def adopt_lowest(self) -> None:
        """After the last round, every replica takes the weights of the one with the lowest peer id:
        a round whose all-reduce was partial (hivemind then keeps local parts) cannot leave two sets."""
        ctx = self.ctx
        lowest = min([*await self.view.my_replicas(), ctx.peer_id])
        if lowest == ctx.peer_id:
            return
        try:
            got, _ = await self.fetch_state([lowest])
        except TransferError as e:
            ctx.say(f"could not take {lowest[-8:]}'s final weights: {e}")
            return
        await ctx.runner.load_state(got, keep_step=True)
