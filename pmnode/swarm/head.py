"""The head driver: stage 0 owns the data and drives the run.

It keeps swarm.max_inflight micro-batches in flight (auto: sized from the measured round trip,
pmnode.swarm.window), waits out pauses, and under a schedule that commits (sync) flushes every step
and commits it with every stage's replicas. It keeps the losses and evaluations and prints one
StepLine per step.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable

from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.data.resolve import open_data
from pmnode.data.shards import DataPosition, PreparedData, past_other_slots, slot_position
from pmnode.errors import PmnodeError
from pmnode.net.auth import Guard
from pmnode.net.envelope import MicroBatch, MicroBatchId, eval_id, make_targets
from pmnode.net.meta import ActivationMeta, GradientMeta, LossMeta
from pmnode.net.routing import capacity
from pmnode.net.rpcs import EVAL
from pmnode.swarm.commit import StepCommit
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.heads import HeadGroup
from pmnode.swarm.membership import SwarmView
from pmnode.swarm.micro_pass import micro_batch_pass
from pmnode.swarm.panel import LogFormat
from pmnode.swarm.participant import CommitParticipant
from pmnode.swarm.pauses import Pauses
from pmnode.swarm.report import Progress
from pmnode.swarm.spot_checks import SpotChecker
from pmnode.swarm.window import InflightSizer, Window, stale_bound

RESIZE_EVERY = 2.0  # seconds between window sizings (stage records refresh about as often)
Micro = list[tuple[Tensor, Tensor]]  # a step's micro-batches: (input, targets as they travel), in order


class HeadDriver:
    def __init__(
        self,
        ctx: NodeContext,
        downstream: Downstream,
        view: SwarmView,
        pauses: Pauses,
        log_format: LogFormat,
        rejoined: Callable[[], bool],
        participant: CommitParticipant,
        guard: Guard,
    ):
        self.ctx, self.downstream, self.view, self.pauses = ctx, downstream, view, pauses
        self.log_format, self.rejoined, self.participant = log_format, rejoined, participant
        self.progress = Progress()
        self.batch: dict[str, tuple[MicroBatchId, Tensor, Tensor]] = {}  # the step being committed
        self.target_key = ""  # the name of the targets as they travel, set with them by _targets
        self.group = HeadGroup(ctx, view)  # the other heads (swarm.heads > 1)
        self.group.resend_own = self._resend
        self.commit = StepCommit(ctx, view, downstream, pauses.wait_whole, self.group, participant)
        self.spot = SpotChecker(ctx, downstream, guard)  # spot checks of stage 1's compute
        self.commit.spot = self.spot
        downstream.excluded = self.spot.banned
        self.samples_driven = 0  # samples of this head's own batches, in steps applied
        sw, n_micro = ctx.cfg.swarm, ctx.cfg.train.batch_size // ctx.cfg.train.micro
        # auto: sync keeps a whole step in flight; async starts so (at least one per stage), then
        # follows the link (pmnode.swarm.window).
        auto = sw.max_inflight == "auto" and not ctx.schedule.commits
        start = max(n_micro, ctx.cfg.n_stages) if auto else n_micro
        size = min(start, sw.inflight_limit) if sw.max_inflight == "auto" else sw.inflight_limit
        bound = stale_bound(sw.inflight_limit, size, sw.stale_steps, n_micro)
        self.sizer = InflightSizer(ctx.cfg.train.micro, bound, size) if auto else None
        self.window = Window(size)
        self.resized_at = 0.0

    def cancel(self) -> None:
        """Stopped: the micro-batches in flight are dropped (their compute jobs finish first)."""
        for task in list(self.window.tasks):
            task.cancel()

    async def _train(self, mb: MicroBatchId, x: Tensor, targets: Tensor, retry: bool = False) -> float:
        ctx = self.ctx
        if retry:  # the stages that already hold its gradient only pass it through
            mb = mb.retried(self.downstream.new_try())
        meta = ActivationMeta(samples=x.shape[0], attempt=mb.attempt)
        t0 = time.perf_counter()
        batch = MicroBatch(mb.wire, Packet({}), self.target_key, targets)  # the forward makes its packet

        def went(wire: Packet, peer: str) -> None:  # maybe, in the background; the commit waits
            self.spot.start(mb, wire, peer)

        # In sync the head steps with the commit; in async as soon as its batch is complete.
        reply, _ = await micro_batch_pass(ctx, self.downstream, mb, meta, batch, x, went=went)
        if self.sizer is not None:
            self.sizer.observe(time.perf_counter() - t0)
        # the downstream check let only a gradient reply through (Downstream._gradient_check)
        return reply.meta.loss if isinstance(reply.meta, GradientMeta) else float("nan")

    async def train_through_pauses(
        self, mb: MicroBatchId, x: Tensor, targets: Tensor, retry: bool = False
    ) -> float:
        """One micro-batch; if it fails because a stage lost its last node, wait for one and send again."""
        while True:
            try:
                return await self._train(mb, x, targets, retry=retry)
            except Exception:
                if not await self.pauses.stage_went_empty():
                    raise
            await self.pauses.wait_whole()
            retry = True  # stages that hold it already only pass it through

    async def _resend(self, ids: list[str]) -> None:
        await asyncio.gather(*(self.train_through_pauses(*self.batch[i], retry=True) for i in ids))

    async def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        ctx, runner = self.ctx, self.ctx.runner
        await self.commit.settle()  # sync: every stage has applied the step being evaluated
        total = 0.0
        for i, (x, targets) in enumerate(batches):
            pkt = await runner.evaluate(None, x)
            batch = MicroBatch(eval_id(i), pkt, self.target_key, targets)
            reply, _ = await self.downstream.send(
                EVAL, ctx.header(batch.name, ActivationMeta()), batch.wire_packet()
            )
            total += reply.meta_as(LossMeta).loss
        return total / len(batches)

    async def _wait_for_downstream(self) -> None:
        waited = 0
        while not self.downstream.records:
            if waited % 30 == 0:  # once, then every half minute: the panel shows the empty downstream too
                self.ctx.console.print(f"waiting for stage {self.ctx.stage + 1} to come online...")
            await asyncio.sleep(1.0)
            waited += 1
            await self.downstream.refresh()

    async def drive(self) -> None:
        ctx, runner, t = self.ctx, self.ctx.runner, self.ctx.cfg.train
        # Reading (or first preparing) the data is the compute thread's work, not the event loop's.
        data = await runner.run(open_data, ctx.cfg.data, t.seq_len, ctx.cfg.model.vocab_size)
        # Held-out batches of every head's batch together: the size `pmnode train` evaluates at.
        eval_size = t.batch_size * ctx.cfg.swarm.heads
        batches = functools.partial(data.heldout.eval_batches, t.eval_batches, eval_size)
        eval_batches = await runner.run(lambda: [(x, self._targets(y)) for x, y in batches()])
        await self._wait_for_downstream()
        await self.view.refresh()
        await self._wait_to_be_brought_in()
        if runner.step >= t.steps:
            raise PmnodeError(
                f"nothing to train: stage 0 is at step {runner.step} and train.steps is "
                f"{t.steps}; pass a larger --steps to continue"
            )
        window, first = self.window, runner.step
        self.group.since = first  # announced: the earliest driver leads the sync commit
        pos = await runner.run(self._start_position, data, first)
        start = time.perf_counter()
        for step in range(first, t.steps):
            micro, pos = await runner.run(self._draw, data, step, pos)
            # A head that took over mid-step: the stages may hold some of this step from its predecessor.
            await self._send_step(window, step, micro, retry=self.rejoined() and step == first)
            await self._resize()
            last = step + 1 == t.steps
            if last:
                await window.drain()
            window.check()
            self.samples_driven += t.batch_size
            self.progress.tokens += t.batch_size * t.seq_len
            await self._record(step + 1, window.take_loss(), eval_batches, last, start, pos)
        self.progress.elapsed = time.perf_counter() - start
        await self.group.set_driving(False)  # no batch of this head is coming any more

    async def _wait_to_be_brought_in(self) -> None:
        """sync, a head joining heads that are past step 0: the leader's next commit copies it the
        stage's state and step (CommitParticipant.rpc_prepare catches up), then it drives."""
        if not self.group.many:
            return
        twin = [r.peer_id[-8:] for r in self.group.others() if r.slot == self.ctx.slot]
        if twin:  # the coordinator saw a partial stage 0 in the DHT: two heads must never read one part
            raise PmnodeError(f"head slot {self.ctx.slot} is already driven by {twin[0]}; join again later")
        if not self.ctx.schedule.commits or self.group.ahead() is None:
            # starting together (or resuming together): every slot's head, announced as driving
            self.group.since = self.ctx.runner.step
            await self.group.wait_for_all()
            return
        self.ctx.console.print("waiting for the leading head's next commit to bring this head up to date")
        await self.group.set_driving(False)
        applied = self.participant.applies
        while self.participant.applies == applied:  # caught up is not enough: a commit must apply here
            await self.participant.reach(self.ctx.runner.step + 1, 1.0)
        await self.group.set_driving(True)

    def _start_position(self, data: PreparedData, first: int) -> DataPosition:
        """(compute thread) Where step `first` reads: its slot's committed position (its checkpoint's,
        or a commit's), else where `first` lockstep batches of its slot reach (a head that took over
        from a replica)."""
        runner, t, heads = self.ctx.runner, self.ctx.cfg.train, self.ctx.cfg.swarm.heads
        slot, per_epoch = self.ctx.slot, data.train.windows
        loaded, known = runner.loaded_data, runner.positions_step == first  # positions of this very step
        pos = runner.slot_positions.get(slot) if known else None
        if pos is None and loaded is not None and loaded[0] == first and heads == 1:
            pos = loaded[1]  # a checkpoint of one head: its own position
        if pos is not None:
            self.ctx.console.print(f"data resumes at epoch {pos.epoch}, window {pos.offset} of {per_epoch}")
        elif known and runner.slot_positions:  # other slots have trained, this one not yet: its first batch
            pos = slot_position(slot, heads, t.batch_size, per_epoch)
        else:
            pos = slot_position(slot, heads, t.batch_size, per_epoch, batches_done=first)
        runner.data_positions[first] = pos
        return pos

    def _targets(self, y: Tensor) -> Tensor:
        """(compute thread) The labels `y` as they travel with the micro-batches (make_targets)."""
        codec = self.ctx.runner.worker.codec
        self.target_key, targets = make_targets(y, codec.sends_tokens, codec.token_dtype)
        return targets

    def _draw(self, data: PreparedData, step: int, pos: DataPosition) -> tuple[Micro, DataPosition]:
        """(compute thread) Step `step`'s batch from `pos`, as micro-batches of (input, targets as they
        travel); where this slot's next batch starts goes with the checkpoint of step + 1."""
        t, heads = self.ctx.cfg.train, self.ctx.cfg.swarm.heads
        x, y, after = data.train.batch(pos, t.batch_size, t.seed)
        after = past_other_slots(after, heads, t.batch_size, data.train.windows)
        self.ctx.runner.data_positions[step + 1] = after
        if heads > 1 and not self.ctx.schedule.commits:  # async: no commit brings positions; its own
            self.ctx.runner.slot_positions[self.ctx.slot] = after
        targets, m = self._targets(y), t.micro
        return [(x[j * m : (j + 1) * m], targets[j * m : (j + 1) * m]) for j in range(len(x) // m)], after

    async def _resize(self) -> None:
        """max_inflight auto: every few seconds, the window the round trip and stage rates call for."""
        now = time.perf_counter()
        if self.sizer is None or now - self.resized_at < RESIZE_EVERY:
            return
        self.resized_at = now
        rates = [self.ctx.runner.throughput()]
        for s in range(1, self.ctx.cfg.n_stages):
            rates.append(capacity(r for r in await self.view.records(s) if r.throughput > 0))
        await self.window.resize(self.sizer.update(rates, now))

    async def _send_step(self, window: Window, step: int, micro: Micro, retry: bool) -> None:
        n_micro = self.ctx.cfg.train.batch_size // self.ctx.cfg.train.micro
        self.batch = {}
        for j, (x, targets) in enumerate(micro):
            # The slot is in the id: micro-batch j of slot h is index h * n_micro + j (pmnode.swarm.heads).
            mb = MicroBatchId(step, self.ctx.slot * n_micro + j)
            self.batch[mb.wire] = (mb, x, targets)
            await window.acquire()
            await self.pauses.wait_whole()
            window.start(functools.partial(self.train_through_pauses, mb, x, targets, retry))
        if self.ctx.schedule.commits:
            await window.drain()
            await self.group.drained(step)
            await self._commit_or_follow(step)

    async def _commit_or_follow(self, step: int) -> None:
        """sync: the leading head commits the step; another waits for the leader's apply, and commits
        itself if the leader's record goes (the next lowest slot leads)."""
        while True:
            if not self.group.many or self.group.leads():
                await self.commit.commit(step, list(self.batch))
                return
            if await self.participant.reach(step + 1, 1.0):
                return
            await self.view.refresh([0])

    async def _record(
        self,
        step: int,
        loss: float | None,
        eval_batches: list[tuple[Tensor, Tensor]],
        last: bool,
        start: float,
        pos: DataPosition,
    ) -> None:
        p, t = self.progress, self.ctx.cfg.train
        if loss is not None:
            p.last_loss = loss
        p.losses.append(p.last_loss if p.last_loss is not None else float("nan"))
        held = None
        if (step % t.eval_every == 0 or last) and self.group.leads():  # one head evaluates: the leader
            held = await self.evaluate(eval_batches)
            p.evals.append((step, p.tokens, held))
        p.elapsed = time.perf_counter() - start
        line = p.line(step, held, self.downstream.stats)
        line.epoch, line.offset = pos.epoch, pos.offset
        line.inflight = self.window.size
        if self.log_format == "json" or not sys.stdout.isatty():  # a terminal gets the panel instead
            print(line.json_line(), flush=True)
