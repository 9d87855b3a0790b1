"""The sync step commit, participant side: every replica of a stage applies the same summed gradient.

prepare  the head asks: catch up if behind, collect the other replicas' gradient sums (grads),
         add them in peer order, hold the total
apply    the head says go: step with the held total
reset    a step's micro-batches are coming again: drop its sums
grads    another replica of this stage asks for this replica's sums of a step

replica_sync.method grads: what travels is each replica's share of its sums, compressed with error
feedback (pmnode.core.grad_sync.GradCompressor), and every replica adds the decoded shares, its own
decoded too, so the replicas' totals (and weights) stay bit-identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import torch
from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.core.compress import Malformed
from pmnode.core.grad_sync import GradCompressor
from pmnode.core.snapshot_meta import SumsMeta
from pmnode.errors import PmnodeError
from pmnode.net.bulk import ALIGN, Ask, BulkServer, Received, Snapshot, TransferError, fetch, pack, unpack
from pmnode.net.checks import GradScale, check_samples, check_sum_part
from pmnode.net.control import Ack, Applied, Apply, Prepare, Prepared, Reset
from pmnode.net.meta import BulkChunk, BulkClose, BulkOpen, BulkRequest
from pmnode.net.outer_report import GradShareReport
from pmnode.net.rpcs import APPLY, GRADS, PREPARE, RESET
from pmnode.net.wire import MessageHeader, WireError
from pmnode.swarm.context import NodeContext
from pmnode.swarm.downstream import Downstream
from pmnode.swarm.outer_jobs import drop_step, idle_step
from pmnode.swarm.replicas import Replicas

RPCS = (PREPARE, APPLY, RESET, GRADS)
GRADS_TIMEOUT = 15.0


def add_part(
    total: Tensor | None,
    part: Tensor | Received,
    like: Tensor,
    scale: GradScale | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Compute thread: every replica adds the parts in sorted peer order, so their sums (and then
    their weights) stay bit-identical; one part at a time, so memory holds two sums, not all.
    A received part must be a sum like ours (`like`: shape, dtype, finite, bounded), or WireError:
    bulk chunks skip the wire's checks, and a one-element tensor would broadcast over everything.
    With `scale`, its norm must also be within the ratio of the recent median of the parts received.
    With `decode` (method grads), a received part is a compressed share, decoded (and checked) first."""
    if isinstance(part, Received):
        part = unpack(part.manifest, part.buffer).get("g", like.new_empty(0))
        if decode is not None:
            try:
                part = decode(part)
            except Malformed as e:
                raise WireError("bad gradient", f"a compressed share: {e}") from e
        check_sum_part(part, like)
        if scale is not None:  # one pass over the sum, as cheap as adding it
            scale.check(float(torch.linalg.vector_norm(part)))
    return part.clone() if total is None else total.add_(part)


class CommitParticipant:
    def __init__(self, ctx: NodeContext, downstream: Downstream, replicas: Replicas):
        self.ctx, self.downstream, self.replicas = ctx, downstream, replicas
        self.prepared: tuple[int, Tensor, int] | None = None  # (step, summed gradients, samples)
        self.stepped = asyncio.Condition()  # notified when this replica's step moves
        self.bulk = BulkServer(ctx.runner.run)  # our gradient sums, for the other replicas
        self.refused: Counter[str] = Counter()  # reason -> replicas' sums refused
        self.strike: Callable[[str], bool] | None = None  # the node's guard: a refused sum is a strike
        # A head among several: waits until its own micro-batches of a step are back (HeadGroup.ready);
        # `waiting` says it sends none (a joiner waiting for the commit that brings it in)
        self.ready: Callable[[int], Awaitable[None]] | None = None
        # sync with outer replica rounds: each replica steps on its own gradients (no exchange)
        self.own_only = False
        self.waiting: Callable[[], bool] = lambda: False
        self.applies = 0  # commits applied here
        # the norms of the sums other replicas sent lately: one far above their median is refused
        self.scale = GradScale(ctx.cfg.swarm.max_grad_ratio)
        # replica_sync.method grads: this replica's compressor (compute thread); None: exact sums
        self.compressor: GradCompressor | None = None
        self.sync_sent = 0  # bytes of sums (or shares) other replicas fetched from here
        self.sync_received = 0  # bytes of sums (or shares) fetched from other replicas
        self.exchanges, self.exchange_s = 0, 0.0  # prepares that fetched others' sums, and their time
        self.weights = ""  # method grads, at exit: the stage's weights, hashed (replicas end equal)

    def _at(self, step: int) -> None:
        if step != self.ctx.runner.step:
            raise PmnodeError(f"this replica is at step {self.ctx.runner.step}, not {step}")

    async def _moved(self) -> None:
        async with self.stepped:
            self.stepped.notify_all()

    async def reach(self, step: int, timeout: float) -> bool:
        """Wait (at most `timeout` s) until this replica is at `step`; whether it got there."""
        runner = self.ctx.runner
        with contextlib.suppress(TimeoutError):
            async with self.stepped:
                await asyncio.wait_for(self.stepped.wait_for(lambda: runner.step >= step), timeout)
        return runner.step >= step

    def own(self, step: int) -> list[str]:
        """The micro-batches whose gradients this replica accumulated for `step`."""
        return sorted(k for k, v in self.ctx.runner.worker.accumulated.items() if v == step)

    async def rpc_prepare(self, req: Prepare, caller: str) -> Prepared:
        ctx = self.ctx
        self.prepared = None
        if self.ready is not None:  # a head's sum must hold its whole batch, not part of it
            await self.ready(req.step)
        if req.step > ctx.runner.step:  # it joined late or missed a commit: catch up first
            await self.replicas.catch_up(req.step, [p for p in sorted(req.peers) if p != ctx.peer_id])
            await self._moved()
        self._at(req.step)
        flat, samples = await ctx.runner.grad_sums()
        like, decode = flat, None
        # alone in the commit: its sums are the stage's total, sent nowhere, so nothing is compressed
        if self.compressor is not None and not self.own_only and set(req.peers) - {ctx.peer_id}:
            flat = await ctx.runner.run(lambda: self._share(req.step, like)[1])  # ours, as others decode it
            decode = self.compressor.decode
        own, unreachable, total = self.own(req.step), [], None
        t0 = time.monotonic()
        for peer in [ctx.peer_id] if self.own_only else sorted(set(req.peers) | {ctx.peer_id}):
            part: Tensor | Received = flat
            if peer != ctx.peer_id:
                try:
                    size = self._sent_size(flat) + ALIGN  # the same sums (or share) as ours, packed
                    ask = self._asker(req.step)
                    open_ = BulkOpen(step=req.step)
                    got = await fetch(ask, [peer], open_, SumsMeta, say=ctx.say, max_size=size)
                    self.sync_received += got.manifest.size
                    # its count, not its word: within the step's whole batch (a negative one flips the sum)
                    assert isinstance(got.manifest.meta, SumsMeta)  # fetch refused any other
                    samples += check_samples(got.manifest.meta.samples, ctx.runner.batch)
                    part = got
                except WireError as e:
                    self._refuse(peer, e)
                    unreachable.append(peer)
                    continue
                except (TransferError, KeyError, ValueError) as e:
                    ctx.say(f"no gradients from {peer[-8:]}: {e}")
                    unreachable.append(peer)
                    continue
            if not unreachable:
                try:
                    total = await ctx.runner.run(add_part, total, part, like, self.scale, decode)
                except WireError as e:  # refused before it touched the sum
                    self._refuse(peer, e)
                    unreachable.append(peer)
        if unreachable or total is None:
            return Prepared(ok=False, own=own, unreachable=unreachable)
        if not self.own_only and len(req.peers) > 1:
            self.exchanges, self.exchange_s = self.exchanges + 1, self.exchange_s + time.monotonic() - t0
        self.prepared = (req.step, total, samples)
        # A head that sent a batch of this step: where its slot reads next once the step is applied.
        position = ctx.runner.data_positions.get(req.step + 1) if ctx.stage == 0 and own else None
        return Prepared(ok=True, own=own, samples=samples, position=position)

    def _sent_size(self, sums: Tensor) -> int:
        """Bytes of what one replica sends for a step: its compressed share, or its sums."""
        return self.compressor.nbytes if self.compressor is not None else sums.numel() * sums.element_size()

    def _share(self, step: int, sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Compute thread: this replica's share of `step` (bytes, decoded), made once per distinct sum
        (`sums`: the step's gradient sums where the caller holds them already)."""
        assert self.compressor is not None
        return self.compressor.share(step, self.ctx.runner.worker.grad_vector() if sums is None else sums)

    def report(self) -> GradShareReport | None:
        """Method grads: what this replica's compressed sums cost (None for exact sums)."""
        if self.compressor is None:
            return None
        exact = 4 * sum(self.compressor.sizes)
        return GradShareReport(
            bytes_per_step=self.compressor.nbytes,
            of_exact=round(self.compressor.nbytes / exact, 5) if exact else 0.0,
            bytes_sent=self.sync_sent,
            bytes_received=self.sync_received,
            steps=self.exchanges,
            exchange_s=round(self.exchange_s / self.exchanges, 4) if self.exchanges else 0.0,
            refused=dict(self.refused),
            weights=self.weights,
        )

    async def final_digest(self) -> None:
        """At exit: the stage's weights hashed, so a summary shows the replicas ended equal."""

        def job() -> str:
            h = hashlib.sha256()
            for t in self.ctx.runner.worker.stage.parameters():
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()[:16]

        self.weights = await self.ctx.runner.run(job)

    def _refuse(self, peer: str, e: WireError) -> None:
        """A replica's sum that fails its checks: never applied, and a strike against its sender."""
        self.ctx.say(f"gradients from {peer[-8:]} refused: {e}")
        self.refused[e.reason] += 1
        if self.strike is not None:
            self.strike(peer)

    def _asker(self, step: int) -> Ask:
        async def ask(peer: str, req: BulkRequest) -> Packet:
            header = self.ctx.header(f"{step}:grads", req)
            return (await self.downstream.ask_replica(GRADS, peer, header, timeout=GRADS_TIMEOUT))[1]

        return ask

    async def rpc_apply(self, req: Apply, caller: str) -> Applied:
        if self.prepared is None or self.prepared[0] != req.step:
            raise PmnodeError(f"step {req.step} was not prepared here")
        _, total, samples = self.prepared
        self.prepared = None
        self.bulk.drop()
        if self.ctx.stage == 0:  # the heads keep every slot's committed position (checkpoints)
            self.ctx.runner.slot_positions = {**self.ctx.runner.slot_positions, **req.positions}
            self.ctx.runner.positions_step = req.step + 1
        if req.drop:  # the head drops the step's batch: nothing of it is applied here either
            if self.compressor is not None:
                await self.ctx.runner.run(self.compressor.forget, req.step)
            step = await self.ctx.runner.run(drop_step, self.ctx.runner, req.step)
            samples = 0
        elif self.own_only and not samples:  # none of the step's micro-batches came here: no update
            step = await self.ctx.runner.run(idle_step, self.ctx.runner)
        else:
            if not self.own_only and req.samples and samples != req.samples:
                # the count is the head's, who assigned the micro-batches: not what the replicas said
                self.ctx.say(f"step {req.step}: the replicas count {samples} samples, the head {req.samples}")
                self.refused["samples not the head's"] += 1
                self.ctx.runner.samples_off += abs(samples - req.samples)
                samples = req.samples
            expected = samples if self.own_only else req.samples or None  # own_only: its own part
            step = await self.ctx.runner.apply_sum(total, samples, expected)
        self.applies += 1
        await self._moved()
        return Applied(step=step, samples=samples)

    async def rpc_reset(self, req: Reset, caller: str) -> Ack:
        self._at(req.step)
        self.prepared = None
        self.bulk.drop()
        await self.ctx.runner.run(self.ctx.runner.worker.forget, req.step)
        return Ack()

    async def rpc_grads(
        self, header: MessageHeader, packet: Packet, caller: str
    ) -> tuple[MessageHeader, Packet]:
        """A replica of our stage asks for our gradient sums of one step (open, then chunks)."""
        req, runner = header.meta, self.ctx.runner
        if not isinstance(req, (BulkOpen, BulkChunk, BulkClose)):
            raise WireError("bad payload", f"a {header.kind} message, not a bulk request")
        step = req.step if isinstance(req, BulkOpen) else None
        if isinstance(req, BulkOpen):
            if step is None:
                raise WireError("bad payload", "no step")
            if self.ready is not None:  # a head: its whole batch of the step, not part of it
                await self.ready(step)
            if step > runner.step and self.waiting():  # a joining head adds nothing: zeros, at once
                return self.ctx.header(header.micro_batch), await self._zeros(req, step)
            if step > runner.step:  # behind: our own prepare of this step is catching us up
                with contextlib.suppress(TimeoutError):
                    async with self.stepped:
                        limit = self.ctx.cfg.swarm.request_timeout / 2
                        await asyncio.wait_for(self.stepped.wait_for(lambda: runner.step >= step), limit)
            self._at(step)

        def snapshot() -> Snapshot:
            w = runner.worker
            sums = self._share(runner.step)[0] if self.compressor is not None else w.grad_vector()
            return pack({"g": sums}, SumsMeta(samples=w.samples_ready, step=runner.step))

        pkt = await self.bulk.answer(req, snapshot, key=f"grads:{step}")
        if isinstance(req, BulkChunk):
            self.sync_sent += sum(t.numel() for t in pkt.tensors.values())
        return self.ctx.header(header.micro_batch), pkt

    async def _zeros(self, req: BulkOpen, step: int) -> Packet:
        """A head still being brought in holds no gradients of `step`: the sum gets exact zeros from it
        without waiting for its catch-up (adding zeros leaves every replica's sum bit-identical)."""
        runner = self.ctx.runner

        def snapshot() -> Snapshot:
            if self.compressor is not None:
                return pack({"g": self.compressor.zeros()}, SumsMeta(samples=0, step=step))
            n = sum(p.numel() for p in runner.worker.stage.parameters())
            return pack({"g": torch.zeros(n)}, SumsMeta(samples=0, step=step))

        return await self.bulk.answer(req, snapshot, key=f"grads:{step}")
