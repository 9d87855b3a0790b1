"""async replicas: the loop that averages a stage's parameters with its other replicas.

Every swarm.average_period, if the stage has other replicas, one round (pmnode.swarm.averaging's
StageAverager over hivemind). At the end of the run: the round in progress finishes, the last
partial batch is applied, then rounds until one holds only finished replicas, so the replicas end
with one set of weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from hivemind.utils import get_dht_time

from pmnode.net.auth import AuthError, Cert, Guard, Verifier
from pmnode.net.relay import fresh_circuits
from pmnode.swarm.averaging import MATCHMAKING_TIME, AveragerStuck, StageAverager, next_round
from pmnode.swarm.context import NodeContext
from pmnode.swarm.guarded_averager import AveragingGate, Refusals, Tunnelled
from pmnode.swarm.replicas import Replicas
from pmnode.swarm.report import Averaging

if TYPE_CHECKING:
    from pmnode.swarm.outer_loop import OuterLoop

LINGER = 5.0  # seconds an async replica keeps its averager after the last round, for the others
FINAL_TRIES = 4  # another replica may still be in a regular round, or finishing its flush
Verdict = Literal["applied", "failed", "refused"]


def judge_round(group: dict[str, Any] | None, verifier: Verifier, stage: int) -> Verdict:
    """A round's result may touch the weights only if it had a partner and every participant showed a
    certificate for this stage."""
    if not group or len(group) < 2:
        return "failed"
    try:
        StageAverager.members(group, verifier, stage)
    except AuthError:
        return "refused"
    return "applied"


def all_final(group: dict[str, Any]) -> bool:
    return all(isinstance(d, dict) and d.get("final") for d in group.values())


class AveragingLoop:
    def __init__(
        self,
        ctx: NodeContext,
        replicas: Replicas,
        cert: Callable[[], Cert],
        stop: asyncio.Event,
        guard: Guard,
    ):
        self.ctx, self.replicas, self.cert, self.stop, self.guard = ctx, replicas, cert, stop, guard
        self.averager: StageAverager | None = None
        self.round: Any = None  # hivemind's StepControl of the round in progress
        self.counts = Averaging()
        self.refusals = Refusals()  # averaging calls the guard refused (counted in the averager process)
        self.tunnelled = Tunnelled()  # averaging calls that came in through a relay's forwarder
        self.behind_nat = False  # relayed: each round starts on fresh circuits to relayed partners
        self.outer: OuterLoop | None = None  # replica_sync.method outer: its rounds replace hivemind's

    def report(self) -> Averaging:
        update = {"calls_refused": self.refusals.snapshot(), "calls_tunnelled": self.tunnelled.value()}
        return self.counts.model_copy(update=update)

    async def run(self, done: asyncio.Event) -> None:
        """Until the run is done, after the round in progress (never cut off: hivemind would run it
        anyway and the replicas' last round could meet the wrong partner)."""
        if self.outer is not None:
            return await self.outer.run(done)
        period = self.ctx.cfg.swarm.average_period
        while not done.is_set():
            at = next_round(period)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), at - get_dht_time() - MATCHMAKING_TIME - 0.2)
            if done.is_set():
                return
            if not await self.replicas.view.my_replicas():
                self.counts.alone += 1
                await asyncio.sleep(max(0.0, at - get_dht_time()))
                continue
            await self.one_round(at)

    def _start_averager(self) -> StageAverager:
        """Started by the first round with a partner: one replica pays nothing."""
        ctx = self.ctx
        # In this (the main) thread: hivemind's averager process sets up signal handling as it starts.
        # the node's guard, as of now, in hivemind's process
        gate = AveragingGate(self.guard, self.refusals, self.tunnelled)
        avg = StageAverager(
            ctx.runner.worker, ctx.dht, ctx.cfg.name, gate, compression=ctx.cfg.swarm.average_compression
        )
        # hivemind ignores SIGINT in this process while it forks the averager, and leaves it so.
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.stop.set)
        ctx.runner.replicated = True
        return avg

    async def one_round(self, at: float, final: bool = False) -> bool:
        """One round; True if its result was applied (and, if `final`, every participant's was final too)."""
        ctx, runner = self.ctx, self.ctx.runner
        if self.averager is None:
            self.averager = self._start_averager()
        avg = self.averager
        leaders = await self.replicas.view.my_replicas()  # from signed records: certified replicas only
        routes = ctx.tunnel  # partners behind NAT: through their relay's forwarder
        avg.averager.use_tunnel(routes.routes, routes.relays, routes.identity)
        if self.behind_nat:  # a partner still reached over a circuit: start from a fresh one
            partners = await self.replicas.view.records(ctx.stage)
            await fresh_circuits(ctx.p2p, [r for r in partners if r.peer_id not in routes.routes])
        try:
            await runner.run(avg.snapshot)
        except AveragerStuck as e:
            return self._replace_stuck(e)
        weight, runner.since_average = runner.since_average, 0
        try:
            control = self.round = avg.start_round(at, weight, self.cert(), leaders, final)
            limit = at - get_dht_time() + avg.timeout + 5.0  # a thread must never wait for ever on it
            group = await asyncio.get_running_loop().run_in_executor(
                None, lambda: control.result(timeout=limit)
            )
        except Exception as e:
            group = None
            ctx.say(f"averaging round failed: {e}")
        verdict = judge_round(group, ctx.verifier, ctx.stage)
        try:
            if verdict == "applied" and not await runner.run(avg.apply):
                verdict = "refused"
        except AveragerStuck as e:
            runner.since_average += weight
            return self._replace_stuck(e)
        if verdict == "failed":
            self.counts.failed += 1
            runner.since_average += weight  # those samples count toward the next round
            return False
        if verdict == "refused":
            self.counts.refused += 1
            ctx.say("averaging round refused: a participant without a certificate, or an unusable result")
            return False
        self.counts.rounds += 1
        if final:
            assert group is not None
            ok = all_final(group)
            ctx.console.print(
                f"stage {ctx.stage}: last averaging round with {len(group)} replicas "
                f"({'all' if ok else 'not all'} finished)"
            )
            return ok
        return True

    async def finish(self, loop_task: asyncio.Task[None] | None) -> None:
        """At the end: the round in progress, the last partial batch, then final rounds."""
        if self.outer is not None:
            return await self.outer.finish(loop_task)
        period = self.ctx.cfg.swarm.average_period
        if loop_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(loop_task, period + 20.0)
        if self.averager is None:
            return
        self.replicas.finishing = True
        await self.ctx.runner.flush_partial()
        try:
            for _ in range(FINAL_TRIES):
                if await self.one_round(next_round(period, lead=MATCHMAKING_TIME + 1.0), final=True):
                    break
            else:
                self.ctx.console.print(f"stage {self.ctx.stage}: no final averaging round with the others")
        finally:
            self.replicas.final_done.set()
        await self.replicas.adopt_lowest()
        await asyncio.sleep(LINGER)  # others may still be receiving parts we reduced, or our state

    def _replace_stuck(self, e: AveragerStuck) -> bool:
        """A round that cannot run: this averager is shut down, the next round starts a new one."""
        self.ctx.say(f"averaging round failed: {e}; starting a new averager")
        self.counts.failed += 1
        self.shutdown()
        self.averager = None
        return False

    def shutdown(self) -> None:
        if self.averager is None:
            return
        if self.round is not None and not self.round.done():
            self.round.cancel()  # its waiting thread returns; the process can exit
        self.averager.shutdown()
