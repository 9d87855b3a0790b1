r"""The head's in-flight window, and `swarm.max_inflight: auto` sizing it from the link.

To keep the slowest stage busy the pipeline must hold as many micro-batches as that stage serves
during one round trip (Little's law, the bandwidth-delay product of the pipeline):

    window = ceil(GAIN * (min_s rate_s / micro) * rtt_min),   clamped to [1, inflight_bound]

rate_s      samples per compute-second stage s serves, summed over its replicas (each node measures
            its own and announces it in its stage record; the head's is its runner's own)
micro       samples per micro-batch
rtt_min     the shortest recent round trip of a micro-batch at the head (forward sent to its
            gradient back): the path's latency and compute without queueing (like BBR's min RTT;
            an average would include the queue the window itself builds, and feed back)
GAIN        2, BBR's congestion-window gain: headroom for jitter and for rates measured on a busy
            machine

Staleness: a micro-batch is about window / (micro-batches per step) optimizer steps stale, so with
more micro-batches per step the same window is fewer steps stale.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable

from pmnode.errors import PmnodeError

GAIN = 2.0
RTT_SAMPLES = 64  # recent round trips kept for the minimum


def auto_window(rtt_min: float, stage_rates: list[float], micro: int, bound: int, gain: float = GAIN) -> int:
    """The window that covers `rtt_min` seconds at the slowest stage's rate (samples/s), in micro-batches."""
    rates = [r for r in stage_rates if r > 0]
    if not rates or rtt_min <= 0:
        return min(bound, 1)
    per_s = min(rates) / max(micro, 1)
    return max(1, min(bound, math.ceil(gain * per_s * rtt_min)))


class InflightSizer:
    """Round trips seen at the head, and the window they call for."""

    def __init__(self, micro: int, bound: int, start: int):
        self.micro, self.bound = micro, bound
        self.size = max(1, min(start, bound))
        self.rtts: deque[float] = deque(maxlen=RTT_SAMPLES)

    def observe(self, rtt: float) -> None:
        self.rtts.append(rtt)

    def update(self, stage_rates: list[float]) -> int:
        """The new size, once every stage has measured its rate and a round trip was seen."""
        if self.rtts and stage_rates and all(r > 0 for r in stage_rates):
            self.size = auto_window(min(self.rtts), stage_rates, self.micro, self.bound)
        return self.size


class Window:
    """The micro-batches in flight: at most `size` (resizable), their losses, and the first failure
    (never dropped: a lost micro-batch would skew the step)."""

    def __init__(self, size: int):
        self.size, self.busy = size, 0
        self.cond = asyncio.Condition()
        self.tasks: set[asyncio.Task] = set()
        self.losses: list[float] = []
        self.failures: list[BaseException] = []

    def check(self) -> None:
        if self.failures:
            raise PmnodeError(f"training stopped: {self.failures[0]}") from self.failures[0]

    async def acquire(self) -> None:
        async with self.cond:  # async: the window, not the step, bounds staleness
            await self.cond.wait_for(lambda: self.busy < self.size)
            self.busy += 1
        self.check()

    async def resize(self, size: int) -> None:
        """A smaller window takes effect as micro-batches come back; a larger one at once."""
        async with self.cond:
            self.size = max(1, size)
            self.cond.notify_all()

    async def _release(self) -> None:
        async with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def start(self, work: Callable[[], Awaitable[float]]) -> None:
        """Run `work` in a slot taken with `acquire`."""

        async def one() -> None:
            try:
                self.losses.append(await work())
            except Exception as e:
                self.failures.append(e)
            finally:
                await asyncio.shield(self._release())

        task = asyncio.create_task(one())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks)
        self.check()

    def take_loss(self) -> float | None:
        if not self.losses:
            return None
        loss = sum(self.losses) / len(self.losses)
        self.losses.clear()
        return loss
