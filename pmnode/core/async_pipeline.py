r"""The async schedule in one process: the swarm's learning dynamics without its network.

`pmnode.core.train.Pipeline` is the reference for `schedule: sync`. This is the same for `async`: the
same `StageWorker`s (weight stashing, the stale-gradient correction, a step as soon as a stage has
finished a batch of backwards), driven in the order a swarm would run them, so a method change can be
measured on several configs in minutes, deterministically, before a swarm confirms it.

The order comes from a discrete-event model of the pipeline. Each stage is one compute thread taking
jobs first come, first served: a forward costs `forward_cost`, a backward twice that (the tail's
forward and backward one job of three); a hop between stages costs `hop` (latency and transfer; the
unit is one forward). The head keeps `window` micro-batches in flight and starts the next one when a
gradient reaches it. Every tensor operation runs at the moment its job starts, so what version of a
stage's weights a micro-batch meets, and how many steps late its gradient is applied, are the ones
the timing gives. The model ignores what a real node adds (queues of other nodes' jobs, replicas,
the window's own sizing): it is for comparing methods at equal delays, not for predicting a swarm.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core.codecs import Packet
from pmnode.core.stages import build_subspace
from pmnode.core.train import eval_loss
from pmnode.core.worker import StageWorker


@dataclass(order=True)
class _Job:
    time: float
    seq: int
    stage: int = field(compare=False)
    mb: str = field(compare=False)
    backward: bool = field(compare=False)
    packet: Packet | None = field(compare=False, default=None)


@dataclass
class AsyncStats:
    """What the emulated run saw: mean delay (in the stage's own steps) of the gradients each stage
    applied, the steps each stage took, and the emulated time (in forwards) the run took."""

    delays: list[float]
    steps: list[int]
    time: float


class AsyncPipeline:
    """All stages of an async run in one process, in a swarm's order (see the module doc)."""

    def __init__(
        self,
        cfg: RunConfig,
        window: int,
        hop: float = 0.0,
        codec: str = "subspace",
        forward_cost: float = 1.0,
    ):
        self.cfg, self.window, self.hop, self.fwd = cfg, max(1, window), hop, forward_cost
        subspace = build_subspace(cfg)
        self.workers = [
            StageWorker(
                cfg, i, codec, "cpu", subspace, stash_weights=True, correction=cfg.swarm.async_correction
            )
            for i in range(cfg.n_stages)
        ]
        self.busy = [0.0] * cfg.n_stages  # when each stage's compute thread is next free
        self.delay_sums = [0.0] * cfg.n_stages
        self._queue: list[_Job] = []
        self._seq = 0

    def _push(self, time: float, stage: int, mb: str, backward: bool, packet: Packet | None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Job(time, self._seq, stage, mb, backward, packet))

    def _step(self, s: int, total_steps: int) -> bool:
        w = self.workers[s]
        batch = self.cfg.train.batch_size
        if w.samples_ready < batch:
            return False
        w.step(total_steps)
        self.delay_sums[s] += w.correction.meter.last
        return True

    def run(
        self,
        batches: Callable[[int], tuple[Tensor, Tensor]],
        steps: int,
        on_head_step: Callable[[int, list[float]], None] | None = None,
    ) -> AsyncStats:
        """Train `steps` batches (`batches(j)` gives the j-th); `on_head_step(step, losses)` after
        each step of the head, with the tail losses of the micro-batches finished since the last."""
        micro, S = self.cfg.train.micro, self.cfg.n_stages
        n = self.cfg.train.batch_size // micro
        pending = [(j, i) for j in range(steps) for i in range(n)]
        pending.reverse()
        data: dict[str, tuple[Tensor, Tensor]] = {}
        inflight, losses = 0, []

        def start(t: float) -> None:
            nonlocal inflight
            j, i = pending.pop()
            if i == 0:
                x, y = batches(j)
                for k in range(n):
                    data[f"{j}:{k}"] = (x[k * micro : (k + 1) * micro], y[k * micro : (k + 1) * micro])
            inflight += 1
            self._push(t, 0, f"{j}:{i}", False, None)

        while pending and inflight < self.window:
            start(0.0)
        while self._queue:
            job = heapq.heappop(self._queue)
            s, w = job.stage, self.workers[job.stage]
            begin = max(job.time, self.busy[s])
            x, y = data[job.mb]
            last = s == S - 1
            if not job.backward and not last:
                out = w.forward(job.mb, job.packet, tokens=x if s == 0 else None, samples=micro)
                self.busy[s] = begin + self.fwd
                self._push(self.busy[s] + self.hop, s + 1, job.mb, False, out)
                continue
            if last:
                loss, g = w.forward_backward(job.mb, job.packet, y, tokens=x if s == 0 else None)
                losses.append(loss)
                self.busy[s] = begin + 3 * self.fwd
            else:
                assert job.packet is not None
                g = w.backward(job.mb, job.packet)
                self.busy[s] = begin + 2 * self.fwd
            stepped = self._step(s, steps)
            if s > 0:
                self._push(self.busy[s] + self.hop, s - 1, job.mb, True, g)
                continue
            data.pop(job.mb)
            inflight -= 1
            if stepped and on_head_step is not None:
                on_head_step(w.step_count, losses)
                losses = []
            if pending:
                start(self.busy[0])  # the gradient is back at the head: the next micro-batch goes
        steps_taken = [w.step_count for w in self.workers]
        delays = [d / max(k, 1) for d, k in zip(self.delay_sums, steps_taken, strict=True)]
        return AsyncStats(delays=delays, steps=steps_taken, time=max(self.busy))

    def eval_loss(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        return eval_loss(self.workers, batches)
