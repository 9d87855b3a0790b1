"""The stage handler: what a stage that is not the head serves to the stage before it.

hello    certificates, both ways
forward  admission (net.services), the payload check (`check_forward`, in the compute-thread job that
         decodes the request), the id checks, the replay window, then the runner's forward, the
         downstream call, the runner's backward
eval     the same without gradients
done     the end of the run, passed on by the node
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net.auth import Cert, Guard
from pmnode.net.checks import check_eval_batch, check_micro_batch
from pmnode.net.control import Ack, Done, Hello
from pmnode.net.envelope import MicroBatch, MicroBatchId, samples_of
from pmnode.net.meta import ActivationMeta, GradientMeta, LossMeta
from pmnode.net.rpcs import DONE, EVAL, FORWARD, HELLO
from pmnode.net.wire import MessageHeader, WireError
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.micro_pass import micro_batch_pass
from pmnode.swarm.replay import ReplayWindow
from pmnode.swarm.roles import check_done
from pmnode.swarm.spot_serve import SpotServer

RPCS = (HELLO, FORWARD, EVAL, DONE)
UPSTREAM_SEEN = 30.0  # seconds a caller counts as upstream on the panel after its last micro-batch
APPLY_WAIT = 5.0  # sync: seconds a micro-batch of the next step waits for this stage's apply


class StageHandler:
    def __init__(self, ctx: NodeContext, downstream: Downstream, guard: Guard, cert: Callable[[], Cert]):
        self.ctx, self.downstream, self.guard, self.cert = ctx, downstream, guard, cert
        self.replay = ReplayWindow(ctx.cfg.swarm.inflight_limit)
        self.upstream: dict[str, float] = {}  # caller -> when it last sent us a micro-batch
        self.last_loss: float | None = None  # the tail's loss of its last micro-batch
        self.done = asyncio.Event()
        self.ended: Done | None = None  # the head's sealed `done`, to pass on
        # sync: the commit participant's wait for a step (set by the node); None: never wait
        self.reach: Callable[[int, float], Awaitable[bool]] | None = None
        self.spot = SpotServer(ctx)  # what it sent, for the head's spot checks (and the `check` RPC)

    def recent_upstream(self) -> list[str]:
        now = time.monotonic()
        return sorted(p for p, t in self.upstream.items() if now - t < UPSTREAM_SEEN)

    async def rpc_hello(self, req: Hello, caller: str) -> Hello:
        self.guard.hello(req.cert, caller)  # AuthError -> an error reply, counted, a strike
        return Hello(cert=self.cert())

    async def rpc_done(self, req: Done, caller: str) -> Ack:
        # only the head ends the run: its seal, checked here, passed on unchanged (swarm.roles)
        self.ended = check_done(req, self.ctx.verifier, self.guard, caller)
        self.done.set()
        return Ack()

    def _admit(self, header: MessageHeader, caller: str) -> MicroBatchId:
        """The id of a micro-batch this stage may take now (window, replay, schedule); WireError if not."""
        ctx, runner, t = self.ctx, self.ctx.runner, self.ctx.cfg.train
        n_micro = t.batch_size // t.micro
        ref = ctx.schedule.ref_step(runner.step, runner.frontier)
        step = check_micro_batch(
            header,
            run=ctx.cfg.name,
            from_stage=ctx.stage - 1,
            n_micro=n_micro * ctx.cfg.swarm.heads,  # every head's: slot h has h * n_micro + j
            step=ref,
            # Async replicas count only their own steps and learn the head's between micro-batches
            # (and from its record every heartbeat), so ids may run ahead of what they know.
            window=ctx.schedule.window(ctx.cfg.swarm.inflight_limit, n_micro),
            seen=self.replay.seen,
        )
        runner.frontier = max(runner.frontier, step)
        if not ctx.schedule.takes(step, runner.step):
            raise WireError(
                "unknown micro-batch", f"{header.micro_batch!r} while this replica is at step {runner.step}"
            )
        mb = MicroBatchId.parse(header)
        cert = self.guard.members.get(caller)
        if ctx.stage == 1 and cert is not None and mb.index // n_micro != cert.slot:
            # A head sends only its own slot's ids (its certificate names the slot): no head can spoil
            # another's micro-batches by taking their ids first.
            raise WireError("unknown micro-batch", f"{header.micro_batch!r} is not of head slot {cert.slot}")
        self.replay.remember(mb, ctx.schedule.ref_step(runner.step, runner.frontier))
        return mb

    async def _admit_after_apply(self, header: MessageHeader, caller: str) -> MicroBatchId:
        """sync: the head sends the next step's forwards while its apply is still on the way here
        (pmnode.swarm.commit), so one may come first: it waits for the apply, briefly, then is admitted."""
        try:
            return self._admit(header, caller)
        except WireError:
            runner = self.ctx.runner
            early = self.ctx.schedule.commits and runner.frontier == runner.step + 1
            if not early or self.reach is None or not await self.reach(runner.step + 1, APPLY_WAIT):
                raise
            return self._admit(header, caller)

    def check_forward(self, header: MessageHeader, packet: Packet) -> None:
        """(compute thread, in the request's decode job) the layout and values: needs no state."""
        self.ctx.runner.verify_activation(packet, self.ctx.cfg.train.micro, samples_of(header))

    async def rpc_forward(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        ctx, runner = self.ctx, self.ctx.runner
        samples = samples_of(header)
        mb = await self._admit_after_apply(header, caller)
        batch = MicroBatch.read(header, packet)
        self.upstream[caller] = time.monotonic()
        if runner.worker.is_last:
            loss, grad = await runner.tail(mb.key, batch.packet, batch.labels, samples)
            self.last_loss = loss
            return ctx.header(mb.wire, GradientMeta(loss=loss)), grad
        meta = header.meta_as(ActivationMeta)  # its samples and try, passed on as they came

        def sent(out: Packet) -> Packet:  # remembered for the head's spot checks
            return self.spot.sent(mb, out)

        reply, up = await micro_batch_pass(ctx, self.downstream, mb, meta, batch, sent=sent)
        assert up is not None  # only the head has no upstream
        return ctx.header(mb.wire, reply.meta_as(GradientMeta)), up

    async def _at_callers_step(self, header: MessageHeader) -> None:
        """sync: an evaluation is of the weights at the caller's step. A replica at another step (one that
        missed a commit, or joined and has no commit yet, so holds its random init) refuses it, not as
        a strike: the caller evaluates through another replica, as a forward of another step would."""
        runner = self.ctx.runner
        if not self.ctx.schedule.commits:  # async: replicas step apart by design
            return
        if runner.step < header.step and self.reach is not None:  # its apply may be on the way
            await self.reach(header.step, APPLY_WAIT)
        if runner.step != header.step:
            raise PmnodeError(f"evaluation of step {header.step}: this replica is at step {runner.step}")

    def check_eval(self, header: MessageHeader, packet: Packet) -> None:
        """(compute thread, in the request's decode job) the id, then the layout and values."""
        ctx = self.ctx
        check_eval_batch(
            header, run=ctx.cfg.name, from_stage=ctx.stage - 1, n_batches=ctx.cfg.train.eval_batches
        )
        # evaluation: whole batches of every head's batch together
        ctx.runner.verify_activation(packet, ctx.cfg.train.batch_size * ctx.cfg.swarm.heads, None)

    async def rpc_eval(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        ctx, runner = self.ctx, self.ctx.runner
        await self._at_callers_step(header)
        batch = MicroBatch.read(header, packet)
        if runner.worker.is_last:
            loss = await runner.evaluate(batch.packet, None, batch.labels)
            return ctx.header(batch.name, LossMeta(loss=loss)), Packet({})
        out = await runner.evaluate(batch.packet)
        reply, _ = await self.downstream.send(
            EVAL, ctx.header(batch.name, ActivationMeta()), batch.passed_on(out).wire_packet()
        )
        return ctx.header(batch.name, reply.meta_as(LossMeta)), Packet({})
