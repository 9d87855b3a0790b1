"""The roles of one node, built once it knows its stage: routes, handlers, replicas, averaging, the
head's driver, and what runs after every heartbeat. pmnode.swarm.node composes them into a Node."""

from __future__ import annotations

import asyncio

from pmnode.core.grad_sync import GradCompressor
from pmnode.errors import PmnodeError
from pmnode.net.auth import Guard
from pmnode.net.callproof import Identity
from pmnode.net.checks import GradScale
from pmnode.net.forwarder import Forwarder
from pmnode.net.reach import Reachability
from pmnode.net.relay import connect_known, reach_out
from pmnode.net.relay_routes import RelayRoutes
from pmnode.net.rpcs import DONE, STATE
from pmnode.net.services import Client, ServeOptions, serve_all
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import TransportStats
from pmnode.net.wire import WireLimits
from pmnode.swarm import handler as handler_mod
from pmnode.swarm import heads as heads_mod
from pmnode.swarm import participant as participant_mod
from pmnode.swarm.average_loop import AveragingLoop
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.handler import StageHandler
from pmnode.swarm.head import HeadDriver
from pmnode.swarm.membership import Membership, SwarmView
from pmnode.swarm.options import NodeOptions
from pmnode.swarm.outer_loop import OuterLoop, outer_rounds
from pmnode.swarm.participant import CommitParticipant
from pmnode.swarm.pauses import Pauses
from pmnode.swarm.replicas import Replicas
from pmnode.swarm.roles import seal_done
from pmnode.swarm.spot_serve import CHECK


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
            tun=ctx.tunnel,
            dht=ctx.dht,
            run=cfg.name,
            stage=ctx.stage,
            n_stages=cfg.n_stages,
            verifier=ctx.verifier,
            cert=membership.current,
            shaper=shaper,
            request_timeout=sw.request_timeout,
            console=ctx.console,
            grad_check=ctx.runner.verify_gradient,
            grad_scale=GradScale(sw.max_grad_ratio),
            compute=ctx.runner.run,
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
        me = Identity(membership.key, membership.current)  # signs the digest of every state it serves
        self.replicas = Replicas(ctx, opts, self.view, self.downstream, identity=me, guard=self.guard)
        self.handler = StageHandler(ctx, self.downstream, self.guard, membership.current)
        self.participant = CommitParticipant(ctx, self.downstream, self.replicas)
        self.participant.strike = self.guard.strike  # a replica's refused gradient sum is a strike
        self.participant.refused = self.guard.rejected  # ...and counted with the node's other refusals
        self.handler.reach = self.handler.spot.reach = self.participant.reach
        self.pauses = Pauses(ctx, self.view, self._resumed)
        self.head = HeadDriver(
            ctx,
            self.downstream,
            self.view,
            self.pauses,
            opts.log_format,
            self._rejoined,
            self.participant,
            self.guard,
        )
        if ctx.runner.worker.is_first and self.head.group.many:
            self.participant.ready = self.head.group.ready  # a head's sum waits for its whole batch
            self.participant.waiting = self.head.group.waiting
        self.averaging = AveragingLoop(ctx, self.replicas, membership.current, stop, self.guard)
        # replica_sync.method outer: the averaging task runs outer rounds instead of hivemind's
        self.outer = OuterLoop(ctx, self.replicas, self.downstream) if outer_rounds(ctx) else None
        self.averaging.outer = self.outer
        self.participant.own_only = self.outer is not None and not ctx.schedule.averages
        if ctx.cfg.replica_sync.method == "grads" and not ctx.schedule.averages:
            shapes = [tuple(p.shape) for p in ctx.runner.worker.stage.parameters()]
            seed = ctx.cfg.train.seed + 1000 * ctx.stage
            self.participant.compressor = GradCompressor(shapes, ctx.cfg.replica_sync, seed)
        self.behind_nat = False  # set once serving: a relayed node opens its own connections (reach_out)
        self.routes = RelayRoutes(ctx.tunnel, membership.current)
        # calls sent through a relay carry this node's own signature; calls forwarded to it must too
        ctx.tunnel.set_identity(Identity(membership.key, membership.current), ctx.verifier)
        self.replicas.route = self.downstream.on_change = self.update_routes
        self.forwarder: Forwarder | None = None  # `--relay` on a reachable node: forwards for NATed members

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
        opts = ServeOptions(self.guard, server_stats, limits, shaper, run=self.ctx.runner.run)
        await serve_all(self.ctx.tunnel, cfg.name, self.handler, handler_mod.RPCS, opts)
        await serve_all(self.ctx.tunnel, cfg.name, self.participant, participant_mod.RPCS, opts)
        await serve_all(self.ctx.tunnel, cfg.name, self.replicas, (STATE,), opts)
        if not self.ctx.runner.worker.is_first:
            await serve_all(self.ctx.tunnel, cfg.name, self.handler.spot, (CHECK,), opts)
        if self.ctx.runner.worker.is_first:
            await serve_all(self.ctx.tunnel, cfg.name, self.head.group, heads_mod.RPCS, opts)
        if self.outer is not None:
            await self.outer.serve(opts)

    async def use_reach(self, reach: Reachability, relay: bool) -> None:
        """Once serving: a relayed node trusts its relays to forward calls to it and opens its own
        connections; a reachable `--relay` member forwards calls for members behind NAT."""
        self.behind_nat = self.averaging.behind_nat = reach.mode == "relayed"
        if self.behind_nat:
            self.routes = RelayRoutes(self.ctx.tunnel, self.membership.current, reach.relays)
        if relay and reach.mode == "direct":
            self.forwarder = Forwarder(self.ctx.tunnel, self.ctx.verifier)
            await self.forwarder.serve()
        await self.downstream.refresh()
        await self.reach_out()
        await self.update_routes()

    async def update_routes(self) -> None:
        """Relayed peers this node calls (next stage, its replicas; the head: every stage) go through
        their relay's forwarder unless a plain connection to them is open."""
        ctx = self.ctx
        records = list(self.downstream.records) + await self.view.records(ctx.stage)
        if ctx.runner.worker.is_first:
            records += [r for recs in self.view.members.values() for r in recs]
        await self.routes.refresh(records)

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
        await self.update_routes()
        await connect_known(ctx.p2p, self.downstream.records)  # relayed peers: their circuits, redialed
        if ctx.schedule.averages and not ctx.runner.worker.is_first:  # averaging partners too
            await connect_known(ctx.p2p, await self.view.records(ctx.stage))
        if ctx.schedule.averages and not ctx.runner.worker.is_first:
            head = await self.view.head_step()
            if head is not None:
                ctx.runner.frontier = max(ctx.runner.frontier, head)
        if ctx.runner.worker.is_first:  # the head commits with every stage's replicas and the other heads
            await self.view.refresh()

    async def catch_up_at_end(self) -> None:
        """sync, replicas stepping together: a replica left out of the last commits (its sums came late
        under load) takes the final state from one that applied them, so every replica ends the run with
        the head's weights. Best effort: the others are finishing too; a failure is said, not raised."""
        ended, runner = self.handler.ended, self.ctx.runner
        if ended is None or ended.seal is None or self.ctx.schedule.averages or self.outer is not None:
            return
        step = ended.seal.step
        peers = await self.view.my_replicas() if runner.step < step else []
        if not peers:
            return
        try:
            await self.replicas.catch_up(step, peers)
        except PmnodeError as e:
            self.ctx.console.print(f"stage {self.ctx.stage}: ended at step {runner.step}, before {step}: {e}")

    async def finish_swarm(self, passes: int = 2, pause: float = 1.0) -> None:
        """Tell the next stage's replicas that training is over (they pass it on). A few passes, since
        a replica's record can be missing from one DHT read: a replica never told would wait for ever.
        Several heads: only the last one to lead tells, once every other head is done."""
        if self.ctx.runner.worker.is_first and self.head.group.many and not await self._last_head():
            return
        client = Client(self.ctx.tunnel, self.ctx.cfg.name)
        ctx, me = self.ctx, Identity(self.membership.key, self.membership.current)
        done = self.handler.ended or seal_done(me, ctx.cfg.name, ctx.peer_id, ctx.runner.step)
        told: set[str] = set()
        for i in range(passes):
            await self.downstream.refresh()
            for rec in self.downstream.records:
                if rec.peer_id in told:
                    continue
                try:
                    await self.downstream.greet(rec.peer_id)  # a replica that never got a micro-batch from us
                    await client.call(DONE, rec.peer_id, done, timeout=10)
                    told.add(rec.peer_id)
                except PmnodeError as e:
                    if i == passes - 1:
                        self.ctx.console.print(f"could not tell {rec.peer_id[-8:]} to stop: {e}")
            if i < passes - 1:
                await asyncio.sleep(pause)

    async def _last_head(self) -> bool:
        """Several heads at the end: whether this one tells the next stage. The lowest online slot does,
        after every other online head has trained all its steps (or left); the others just leave."""
        group, steps = self.head.group, self.ctx.cfg.train.steps
        while True:
            await self.view.refresh([0])
            if not group.leads():
                return False
            if all(r.step >= steps for r in group.others()):
                return True
            await asyncio.sleep(1.0)
