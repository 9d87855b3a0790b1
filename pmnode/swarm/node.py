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
from collections.abc import Awaitable
from typing import Any

import torch
from hivemind import DHT
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.net.auth import Verifier
from pmnode.net.control import coordinator_peer
from pmnode.net.dht import announce
from pmnode.net.reach import Reachability
from pmnode.net.records import SwarmValidator
from pmnode.net.routing import StageRecord
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import TransportStats
from pmnode.net.tunnel import Tunnel
from pmnode.swarm.context import NodeContext
from pmnode.swarm.fit import check_fits
from pmnode.swarm.membership import Membership, heartbeat
from pmnode.swarm.options import NodeOptions
from pmnode.swarm.panel import Display
from pmnode.swarm.parts import Parts
from pmnode.swarm.reachability import start_network
from pmnode.swarm.report import NodeSummary
from pmnode.swarm.runner import Checkpoints, StageRunner
from pmnode.swarm.schedule import schedule_named
from pmnode.swarm.telemetry import Telemetry


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
            await parts.use_reach(self.reach, self.opts.relay)
            telemetry = Telemetry(parts, self.opts, self.server_stats, self.reach)
            self._say_serving(ctx)
            await self._serve_until_done(parts, telemetry, stop)
            if parts.participant.compressor is not None:
                await parts.participant.final_digest()
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
        tun = Tunnel(p2p)  # this node's one tunnel over this P2P: routes, relays, handlers
        membership = Membership(o, tun, peer_id, self.console)
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
        ctx = NodeContext(cfg, schedule, dht, p2p, tun, peer_id, verifier, runner, self.console, reply.slot)
        return ctx, membership

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
        averaging, first = None, ctx.runner.worker.is_first
        driven = asyncio.Event()  # a head: its drive is over (its averaging stops then)
        # async: replicas of a stage average; the heads too when there are several
        # sync with replica_sync.method outer: the replicas' outer rounds run as averaging does
        if (ctx.schedule.averages or parts.outer is not None) and (not first or ctx.cfg.swarm.heads > 1):
            done = driven if first else parts.handler.done
            averaging = asyncio.create_task(parts.averaging.run(done), name="averaging")
            averaging.add_done_callback(self._task_ended)
        try:
            if first:
                await self._drive(parts, stop, driven, averaging)
            else:
                await _first(parts.handler.done.wait(), stop.wait())
                if parts.handler.done.is_set():
                    await parts.catch_up_at_end()
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
                if ctx.runner.disk_problem:  # the run goes on elsewhere; this node says why it has none
                    self.console.print(f"checkpoint not saved: {ctx.runner.disk_problem}", highlight=False)
            offline = StageRecord(peer_id=ctx.peer_id, stage=ctx.stage, state="offline", time=time.time())
            # Best effort: if the DHT process is gone (SIGTERM to the whole group), don't hang on it;
            # the record expires after RECORD_TTL anyway.
            with contextlib.suppress(Exception):
                cert, key = parts.membership.current(), parts.membership.key
                await asyncio.wait_for(announce(ctx.dht, ctx.cfg.name, offline, cert, key), 5.0)

    async def _drive(
        self, parts: Parts, stop: asyncio.Event, driven: asyncio.Event, averaging: asyncio.Task[None] | None
    ) -> None:
        driver = asyncio.create_task(parts.head.drive())
        await _first(driver, stop.wait())
        if driver.done():
            driver.result()
            driven.set()
            if averaging is not None:  # several async heads: their last rounds, as replicas do
                await parts.averaging.finish(averaging)
            await parts.finish_swarm()
        else:
            driver.cancel()
            parts.head.cancel()

    async def _show(self, telemetry: Telemetry) -> None:
        while True:
            self.display.show(telemetry.snapshot())
            await asyncio.sleep(0.5)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.console.print(f"{task.get_name()} stopped: {task.exception()!r}")


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of these finishes; the others are cancelled (a task passed in is not)."""
    tasks = [a if isinstance(a, asyncio.Task) else asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        if t not in aws:
            t.cancel()
