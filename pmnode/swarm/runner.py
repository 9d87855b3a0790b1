"""The stage runner: the stage's worker, the one compute thread and the step policy.

Every torch call of a node goes through here (forward, backward, step, payload checks that touch
tensors, gradient sums, state copies, checkpoint save and load), as one job on one thread. The
event loop only schedules: nothing touches the weights from it, and since jobs run one at a time,
a checkpoint is never written while a step is half applied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from pmnode.config import MachineConfig, RunConfig
from pmnode.core import checkpoint
from pmnode.core.codecs import Packet
from pmnode.core.durable import disk_problem
from pmnode.core.replica_state import load_state_tensors
from pmnode.core.worker import StageWorker
from pmnode.data.shards import DataPosition
from pmnode.net.bulk import Received, unpack
from pmnode.net.checks import GradScale, check_activation, check_gradient
from pmnode.swarm.report import ComputeTimes
from pmnode.swarm.schedule import Schedule

T = TypeVar("T")


def needs_step(samples_ready: int, batch_size: int, force: bool = False) -> bool:
    """Step when the samples whose backward finished make a batch (or when told to: a commit)."""
    return force or samples_ready >= batch_size


@dataclass
class Checkpoints:
    root: Path
    every: int  # steps between checkpoints; 0: only on exit


class StageRunner:
    def __init__(
        self,
        worker: StageWorker,
        cfg: RunConfig,
        schedule: Schedule,
        checkpoints: Checkpoints | None,
        pool: ThreadPoolExecutor,
    ):
        self.worker, self.cfg, self.schedule, self.checkpoints = worker, cfg, schedule, checkpoints
        self.pool = pool
        self.busy = 0.0  # seconds the compute thread worked
        self.times = ComputeTimes()  # forward/backward job times, for plan --measured and calibration
        self.samples_applied = 0
        self.samples_served = 0  # samples whose backward finished here: with `busy`, the service rate
        self.since_average = 0  # samples applied since this replica's last averaging round
        self.samples_off = 0  # summed |samples applied - batch_size| over the steps: 0 when exact
        self.frontier = 0  # async: the furthest step of a micro-batch taken here (or the head's)
        self.replicated = False  # async: has shared this stage with another node
        # Told each optimizer step's samples, on this thread (outer replica rounds count their steps).
        self.on_step: Callable[[int], None] | None = None
        # The head's data position after N steps, by N (saved with the checkpoint of step N), and the
        # (step, position) of the checkpoint this stage was loaded from.
        self.data_positions: dict[int, DataPosition] = {}
        self.loaded_data: tuple[int, DataPosition | None] | None = None
        self.disk_problem: str | None = None  # why the last checkpoint was not written (a full disk)
        # Several heads: every slot's committed data position at this step (a sync commit brings them),
        # saved with stage 0's checkpoint so a resumed or replacement head goes on from its slot's.
        self.slot_positions: dict[int, DataPosition] = {}
        self.positions_step: int | None = None  # the step slot_positions are of (a stale one misleads)

    @classmethod
    async def start(
        cls,
        cfg: RunConfig,
        schedule: Schedule,
        checkpoints: Checkpoints | None,
        stage: int,
        machine: MachineConfig,
    ) -> StageRunner:
        """Build the stage (weights, subspace, optimizer) on the compute thread it will live on."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="pmnode-compute")

        def build() -> StageWorker:
            return StageWorker(
                cfg,
                stage,
                cfg.codec_spec,
                machine.device,
                stash_weights=schedule.stash_weights,
                autocast_bf16=machine.autocast_bf16,
                checkpoint_layers=machine.checkpoint_layers,
                optimizer_state=machine.optimizer_state,
                fused_adam=machine.fused_adam if machine.fused_adam is not None else "cuda" in machine.device,
                correction=cfg.swarm.async_correction,
            )

        worker = await asyncio.get_running_loop().run_in_executor(pool, build)
        return cls(worker, cfg, schedule, checkpoints, pool)

    # ---- the one thread ------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: object) -> T:
        def timed() -> T:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args)
            finally:
                self.busy += time.perf_counter() - t0  # one compute thread: the only writer
                self.times.cpu_s += time.thread_time() - c0

        return await asyncio.get_running_loop().run_in_executor(self.pool, timed)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def step(self) -> int:
        return self.worker.step_count

    def throughput(self) -> float:
        """Samples/s this node can serve: per second of micro-batch compute (forwards and backwards),
        not of wall time, so a replica that got little traffic is not mistaken for a slow one (0 until
        it has measured itself). Not per second of all its compute either: every replica pays the
        same per-step work (optimizer step, gradient sums, checks) whatever it served, so over that
        a replica that served less looks slower, gets less, and looks slower still (seen: one tail
        replica of two ran 220 of 240 micro-batches)."""
        work = self.times.forward_s + self.times.backward_s
        return round(self.samples_served / work, 3) if work > 0.2 and self.samples_served else 0.0

    # ---- the step policy (compute thread) ------------------------------------------------------------
    def _step_if_ready(self, force: bool = False, expected: int | None = None) -> tuple[int, float] | None:
        batch = expected or self.batch
        if not needs_step(self.worker.samples_ready, batch, force):
            return None
        # An async replica makes only its share of the stage's steps: the schedule follows the head.
        lr_step = max(self.frontier, self.worker.step_count) if self.replicated else None
        applied, lr = self.worker.step(self.cfg.train.steps, lr_step)
        self.samples_applied += applied
        self.since_average += applied
        # A step of anything but batch_size samples lost or double-counted micro-batches on the way.
        self.samples_off += abs(applied - batch)
        if self.on_step is not None:
            self.on_step(applied)
        c = self.checkpoints
        if c is not None and c.every and self.worker.step_count % c.every == 0:
            self._save()
        return applied, lr

    @property
    def batch(self) -> int:
        """Samples per step: a head steps on its own batch; the later stages on every head's."""
        t = self.cfg.train
        return t.batch_size if self.worker.is_first else t.batch_size * self.cfg.swarm.heads

    def _after_backward(self, samples: int) -> None:
        self.samples_served += samples
        if self.schedule.steps_after_backward:  # in the backward's job: every step has batch_size samples
            self._step_if_ready()

    def _save(self) -> None:
        c = self.checkpoints
        if c is None:
            return
        try:
            self._write_checkpoint(c)
            self.disk_problem = None
        except OSError as e:  # a full disk must not stop training: the last good checkpoint stays
            self.disk_problem = f"{disk_problem(e, c.root)}; keeping the last good checkpoint"
        except checkpoint.NewerCheckpoint as e:
            self.disk_problem = str(e)

    def _write_checkpoint(self, c: Checkpoints) -> None:
        step = self.worker.step_count
        data = self.data_positions.get(step)
        slots = self.slot_positions if self.worker.is_first else {}
        checkpoint.save(
            self.worker, c.root, self.cfg.name, self.samples_applied, data, slots, keep_newer=True
        )
        for done in [s for s in self.data_positions if s < step]:
            del self.data_positions[done]
        checkpoint.save_run_config(self.cfg, c.root)

    # ---- data path -----------------------------------------------------------------------------------
    async def forward(self, key: str, packet: Packet | None, tokens: Tensor | None, samples: int) -> Packet:
        def job() -> Packet:
            t0 = time.perf_counter()
            out = self.worker.forward(key, packet, tokens, samples).on_host()
            self.times.forward_s += time.perf_counter() - t0
            self.times.forwards += 1
            return out

        return await self.run(job)

    def _backward_done(self, t0: float) -> None:
        self.times.backward_s += time.perf_counter() - t0
        self.times.backwards += 1

    async def tail(
        self, key: str, packet: Packet, labels: Callable[[], Tensor], samples: int
    ) -> tuple[float, Packet]:
        """The last stage's forward and backward; `labels` makes the loss's targets, in the same job."""

        def job() -> tuple[float, Packet]:
            t0 = time.perf_counter()
            loss, grad = self.worker.forward_backward(key, packet, labels())
            self._backward_done(t0)
            self._after_backward(samples)
            assert grad is not None  # a tail of two or more stages always has an upstream
            return loss, grad.on_host()

        return await self.run(job)

    async def backward(self, key: str, grad: Packet, samples: int) -> Packet | None:
        def job() -> Packet | None:
            t0 = time.perf_counter()
            up = self.worker.backward(key, grad)
            self._backward_done(t0)
            self._after_backward(samples)
            return up.on_host() if up is not None else None

        return await self.run(job)

    async def abandon(self, key: str) -> None:
        await self.run(self.worker.abandon, key)

    async def evaluate(
        self, packet: Packet | None, tokens: Tensor | None = None, labels: Callable[[], Tensor] | None = None
    ) -> Any:  # a Packet for the next stage, or the last stage's loss: each caller knows which it is
        def job() -> Any:
            out = self.worker.evaluate(packet, tokens, labels() if labels is not None else None)
            return out.on_host() if isinstance(out, Packet) else out

        return await self.run(job)

    def verify_activation(self, packet: Packet, max_batch: int, samples: int | None) -> None:
        """(compute thread) WireError unless `packet` is an activation this stage could be sent
        (net.checks.check_activation against the stage's codec and the run's sizes)."""
        cfg = self.cfg
        check_activation(
            packet,
            self.worker.codec,
            vocab_size=cfg.model.vocab_size,
            max_batch=max_batch,
            max_len=cfg.train.seq_len,
            samples=samples,
        )

    def verify_gradient(self, grad: Packet, shape: tuple[int, int], scale: GradScale) -> None:
        """(compute thread) WireError unless `grad` is the gradient of an activation of `shape`."""
        check_gradient(grad, self.worker.codec, shape, scale)

    # ---- commits and replica state -------------------------------------------------------------------
    async def grad_sums(self) -> tuple[Tensor, int]:
        return await self.run(lambda: (self.worker.grad_vector(), self.worker.samples_ready))

    async def apply_sum(self, total: Tensor, samples: int, expected: int | None = None) -> int:
        """Step with the replicas' summed gradient; `expected`: the samples the commit meant (every
        head's), against which a step's samples count as exact or not (samples_off)."""

        def job() -> int:
            self.worker.set_grads(total, samples)
            self._step_if_ready(force=True, expected=expected)
            return self.worker.step_count

        return await self.run(job)

    async def step_if_ready(self) -> None:
        await self.run(self._step_if_ready)

    async def load_state(self, got: Received, keep_step: bool = False, at_step: int | None = None) -> None:
        """Become the replica this state was copied from (checked first; `at_step`: the step it must be
        of); `keep_step`: this replica's own step count stays."""

        def job() -> None:
            step = self.worker.step_count
            load_state_tensors(self.worker, unpack(got.manifest, got.buffer), got.manifest.meta, at_step)
            if keep_step:
                self.worker.step_count = step

        await self.run(job)

    async def move_to(self, step: int) -> None:
        def job() -> None:
            self.worker.step_count = step

        await self.run(job)

    async def flush_partial(self) -> None:
        """async, at the end: a replica's last, partial batch is applied, not lost."""

        def job() -> None:
            if self.worker.samples_ready:
                at = max(self.frontier, self.worker.step_count)
                applied, _ = self.worker.step(self.cfg.train.steps, at)
                self.samples_applied += applied
                self.since_average += applied
                if self.on_step is not None:
                    self.on_step(applied)

        await self.run(job)

    # ---- checkpoints ---------------------------------------------------------------------------------
    async def save(self) -> None:
        """Write the stage's checkpoint after whatever job is running: never a torn one."""
        await self.run(self._save)

    async def load(self, root: Path) -> checkpoint.Manifest:
        man = await self.run(checkpoint.load, self.worker, root)
        self.samples_applied = man.samples
        self.loaded_data = (man.step, man.data)
        self.slot_positions, self.positions_step = dict(man.slots), man.step
        return man
