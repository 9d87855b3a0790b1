"""A swarm node: one stage of the run, served over hivemind P2P. This module only composes it.

Data path (one RPC per boundary and micro-batch, SWARM-style): a stage's `forward` handler runs its
layers, calls the next stage's `forward` and gets the gradient back in the reply, backpropagates,
and replies upstream with its own gradient. The call stack remembers the route, so gradients
retrace the activations' path. The head drives: it owns the data and keeps `swarm.max_inflight`
micro-batches in flight. What differs between sync and async is the Schedule object.

The parts, each owning its state (see docs/architecture.md):
    runner       StageRunner: the worker, the one compute thread, the step policy, checkpoints
    downstream   Downstream: routes, backoff, hello, shaping, reply checks
    handler      StageHandler: hello, forward, eval, done
    participant  CommitParticipant: prepare, apply, reset, grads (sync commits)
    replicas     Replicas: state, catch-up, copy, take-over
    averaging    AveragingLoop (async replicas)
    head         HeadDriver (stage 0): data, in-flight window, commits, pauses, losses
    membership   Membership, SwarmView, heartbeat
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import torch
from hivemind import DHT
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.net.auth import Guard, Verifier
from pmnode.net.checks import GradScale
from pmnode.net.control import Done, coordinator_peer
from pmnode.net.dht import announce
from pmnode.net.reach import Reachability
from pmnode.net.records import SwarmValidator
from pmnode.net.relay import connect_known, reach_out
from pmnode.net.routing import StageRecord
from pmnode.net.rpcs import DONE, STATE
from pmnode.net.services import Client, ServeOptions, serve_all
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import TransportStats
from pmnode.net.wire import WireLimits
from pmnode.swarm import handler as handler_mod
from pmnode.swarm import participant as participant_mod
from pmnode.swarm.average_loop import AveragingLoop
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.fit import check_fits
from pmnode.swarm.handler import StageHandler
from pmnode.swarm.head import HeadDriver
from pmnode.swarm.membership import Membership, SwarmView, heartbeat
from pmnode.swarm.options import NodeOptions
from pmnode.swarm.panel import Display
from pmnode.swarm.participant import CommitParticipant
from pmnode.swarm.pauses import Pauses
from pmnode.swarm.reachability import start_network
from pmnode.swarm.replicas import Replicas
from pmnode.swarm.report import NodeSummary
from pmnode.swarm.runner import Checkpoints, StageRunner
from pmnode.swarm.schedule import schedule_named
from pmnode.swarm.telemetry import Telemetry


class Parts:
    """The roles of one node, built once it knows its stage."""

    def __init__(
        self,
        ctx: NodeContext,
        opts: NodeOptions,
        membership: Membership,
        shaper: LinkShaper,
        stop: asyncio.Event,
    ):
        cfg, sw = ctx.cfg, ctx.cfg.swarm
        self.ctx, self.membership = ctx, membership
        self.view = SwarmView(ctx.dht, cfg.name, cfg.n_stages, ctx.stage, ctx.peer_id, ctx.verifier)
        self.downstream = Downstream(
            p2p=ctx.p2p,
            dht=ctx.dht,
            run=cfg.name,
            stage=ctx.stage,
            n_stages=cfg.n_stages,
            verifier=ctx.verifier,
            cert=membership.current,
            shaper=shaper,
            request_timeout=sw.request_timeout,
            console=ctx.console,
            grad_check=ctx.runner.check_gradient,
            grad_scale=GradScale(sw.max_grad_ratio),
        )
        membership.renewed.append(self.downstream.greeted.clear)
        self.guard = Guard(
            ctx.verifier,
            ctx.stage,
            rate=sw.peer_rate,
            burst=max(64, 2 * sw.inflight_limit),
            ban_after=sw.ban_after,
            ban_seconds=sw.ban_seconds,
        )
        self.replicas = Replicas(ctx, opts, self.view, self.downstream)
        self.handler = StageHandler(ctx, self.downstream, self.guard, membership.current)
        self.participant = CommitParticipant(ctx, self.downstream, self.replicas)
        self.handler.reach = self.participant.reach
        self.pauses = Pauses(ctx, self.view, self._resumed)
        self.head = HeadDriver(ctx, self.downstream, self.view, self.pauses, opts.log_format, self._rejoined)
        self.averaging = AveragingLoop(ctx, self.replicas, membership.current, stop, self.guard)
        self.behind_nat = False  # set once serving: a relayed node opens its own connections (reach_out)

    def _rejoined(self) -> bool:
        return self.replicas.rejoined

    async def _resumed(self) -> None:
        """The swarm changed: whom we gave up on before may be back, and new routes are untried."""
        self.downstream.forget_failures()
        self.head.commit.failed_at.clear()
        await self.downstream.refresh()

    async def serve(self, server_stats: TransportStats, shaper: LinkShaper) -> None:
        cfg, t = self.ctx.cfg, self.ctx.cfg.train
        # No honest message is larger than a whole batch of dense fp32 activations: refuse beyond that
        # before buffering it.
        limits = WireLimits(max_bytes=max(2**20, 2 * t.batch_size * t.seq_len * (4 * cfg.model.d_model + 16)))
        opts = ServeOptions(self.guard, server_stats, limits, shaper)
        await serve_all(self.ctx.p2p, cfg.name, self.handler, handler_mod.RPCS, opts)
        await serve_all(self.ctx.p2p, cfg.name, self.participant, participant_mod.RPCS, opts)
        await serve_all(self.ctx.p2p, cfg.name, self.replicas, (STATE,), opts)

    async def reach_out(self) -> None:
        """Behind NAT: connect to the reachable peers that call this node, so they need no relay."""
        ctx = self.ctx
        if not self.behind_nat or ctx.runner.worker.is_first:
            return
        await reach_out(ctx.p2p, await self.view.records(ctx.stage - 1))
        if ctx.schedule.averages:
            await reach_out(ctx.p2p, await self.view.records(ctx.stage))

    async def every_beat(self) -> None:
        """After each heartbeat: fresh routes; async: the head's step; the head: every stage's replicas."""
        ctx = self.ctx
        await self.downstream.refresh()
        await self.reach_out()
        await connect_known(ctx.p2p, self.downstream.records)  # relayed peers: their circuits, redialed
        if ctx.schedule.averages and not ctx.runner.worker.is_first:  # averaging partners too
            await connect_known(ctx.p2p, await self.view.records(ctx.stage))
        if ctx.schedule.averages and not ctx.runner.worker.is_first:
            head = await self.view.head_step()
            if head is not None:
                ctx.runner.frontier = max(ctx.runner.frontier, head)
        if ctx.runner.worker.is_first:  # the head commits with every stage's replicas
            await self.view.refresh()

    async def finish_swarm(self) -> None:
        """Tell the next stage's replicas that training is over (they pass it on)."""
        client = Client(self.ctx.p2p, self.ctx.cfg.name)
        await self.downstream.refresh()
        for rec in self.downstream.records:
            try:
                await self.downstream.greet(rec.peer_id)  # a replica that never got a micro-batch from us
                await client.call(DONE, rec.peer_id, Done(), timeout=10)
            except PmnodeError as e:
                self.ctx.console.print(f"could not tell {rec.peer_id[-8:]} to stop: {e}")


class Node:
    """Setup, serve, shutdown: `start()` outside any event loop, then `run(stop)` inside one."""

    def __init__(self, opts: NodeOptions, console: Console):
        self.opts, self.console = opts, console
        self.display = Display(console, opts.log_format)
        self.shaper = LinkShaper(opts.link_bandwidth, opts.link_latency)
        self.server_stats = TransportStats()  # calls this node serves (from the previous stage)
        self.dht: DHT | None = None
        self.reach = Reachability()

    def start(self) -> None:
        """Start the DHT outside any event loop (see start_dht)."""
        coordinator_peer(self.opts.coordinator)  # validate the address before starting anything
        self.dht, self.reach = start_network(self.opts, self.console)

    async def run(self, stop: asyncio.Event) -> NodeSummary:
        if self.dht is None:
            raise PmnodeError("Node.start() must run before Node.run()")
        dht, runner = self.dht, None
        try:
            ctx, membership = await self._join(dht)
            runner = ctx.runner
            parts = Parts(ctx, self.opts, membership, self.shaper, stop)
            if self.opts.resume:
                await parts.replicas.resume()
            await parts.replicas.take_over_if_empty()
            await parts.serve(self.server_stats, self.shaper)
            parts.behind_nat = self.reach.mode == "relayed"
            await parts.reach_out()
            telemetry = Telemetry(parts, self.opts, self.server_stats, self.reach)
            self._say_serving(ctx)
            await self._serve_until_done(parts, telemetry, stop)
            return telemetry.summary()
        finally:
            if runner is not None:
                runner.close()
            dht.shutdown()

    async def _join(self, dht: DHT) -> tuple[NodeContext, Membership]:
        """Join the run, check what the coordinator sent, build the stage on its compute thread."""
        o = self.opts
        p2p = await dht.replicate_p2p()
        peer_id = dht.peer_id.to_base58()
        membership = Membership(o, p2p, peer_id, self.console)
        reply = await membership.join()
        cfg = RunConfig.model_validate(reply.config)
        verifier = Verifier(cfg.name, reply.authority)
        # From now on this DHT peer refuses run records that are not signed by members.
        dht.add_validators([SwarmValidator(cfg.name, cfg.n_stages, reply.authority)])
        if cfg.n_stages < 2:
            raise PmnodeError("this run has one stage: a swarm needs two or more; use `pmnode train`")
        if o.machine.data:  # this machine's copy of the agreed corpus
            cfg = cfg.with_overrides(data={"source": o.machine.data})
        if reply.stage == 0:  # the head reads the data: refused here unless it is the run's (off the loop)
            from pmnode.data.resolve import open_data

            await asyncio.to_thread(open_data, cfg.data, cfg.train.seq_len, cfg.model.vocab_size)
        if o.machine.threads:
            torch.set_num_threads(o.machine.threads)
        schedule = schedule_named(cfg.swarm.schedule)
        ckpt = Checkpoints(o.checkpoint_dir, o.checkpoint_every) if o.checkpoint_dir else None
        check_fits(cfg, reply.stage, o.machine)  # one line now, not an out-of-memory kill later
        runner = await StageRunner.start(cfg, schedule, ckpt, reply.stage, o.machine)
        sub = runner.worker.stage.subspace
        mine = sub.fingerprint if sub is not None else None
        if mine != reply.fingerprint:
            raise PmnodeError(
                f"subspace fingerprint mismatch: coordinator has {reply.fingerprint}, this node "
                f"built {mine}; upgrade pmnode to the coordinator's version"
            )
        return NodeContext(cfg, schedule, dht, p2p, peer_id, verifier, runner, self.console), membership

    def _say_serving(self, ctx: NodeContext) -> None:
        r, cfg = ctx.runner.worker.stage.layer_range, ctx.cfg
        self.console.print(
            f"node {ctx.peer_id[-8:]} serves stage {ctx.stage} (layers {r.start}..{r.stop - 1}) "
            f"of run {cfg.name}, codec {cfg.codec_spec}, {cfg.swarm.schedule}"
            + (f", links emulated at {self.shaper.describe()}" if self.shaper.active else "")
        )

    async def _serve_until_done(self, parts: Parts, telemetry: Telemetry, stop: asyncio.Event) -> None:
        ctx, o = parts.ctx, self.opts
        beat = asyncio.create_task(
            heartbeat(
                ctx.dht, ctx.cfg.name, o.coordinator, parts.membership, telemetry.record, parts.every_beat
            ),
            name="heartbeat",
        )
        beat.add_done_callback(self._task_ended)
        ui = asyncio.create_task(self._show(telemetry))
        averaging = None
        if ctx.schedule.averages and not ctx.runner.worker.is_first:
            averaging = asyncio.create_task(parts.averaging.run(parts.handler.done), name="averaging")
            averaging.add_done_callback(self._task_ended)
        try:
            if ctx.runner.worker.is_first:
                await self._drive(parts, stop)
            else:
                await _first(parts.handler.done.wait(), stop.wait())
                if parts.handler.done.is_set():
                    await parts.finish_swarm()
                    if averaging is not None:
                        await parts.averaging.finish(averaging)
        finally:
            for task in (beat, ui, averaging):
                if task is not None:
                    task.cancel()
            parts.averaging.shutdown()
            self.display.close(telemetry.snapshot())
            if o.checkpoint_dir:  # on the compute thread, after the job in progress: never torn
                await ctx.runner.save()
            offline = StageRecord(peer_id=ctx.peer_id, stage=ctx.stage, state="offline", time=time.time())
            # Best effort: if the DHT process is gone (SIGTERM to the whole group), don't hang on it;
            # the record expires after RECORD_TTL anyway.
            with contextlib.suppress(Exception):
                cert, key = parts.membership.current(), parts.membership.key
                await asyncio.wait_for(announce(ctx.dht, ctx.cfg.name, offline, cert, key), 5.0)

    async def _drive(self, parts: Parts, stop: asyncio.Event) -> None:
        driver = asyncio.create_task(parts.head.drive())
        await _first(driver, stop.wait())
        if driver.done():
            driver.result()
            await parts.finish_swarm()
        else:
            driver.cancel()
            parts.head.cancel()

    async def _show(self, telemetry: Telemetry) -> None:
        while True:
            self.display.show(telemetry.snapshot())
            await asyncio.sleep(0.5)

    def _task_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.console.print(f"{task.get_name()} stopped: {task.exception()!r}")


async def _first(*aws: object) -> None:
    """Wait until the first of these finishes; the others are cancelled (a task passed in is not)."""
    tasks = [a if isinstance(a, asyncio.Task) else asyncio.ensure_future(a) for a in aws]  # type: ignore[arg-type]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        if t not in aws:
            t.cancel()
