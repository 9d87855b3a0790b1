r"""The head's in-flight window, and `swarm.max_inflight: auto` sizing it from the link.

To keep the pipeline busy it must hold as many micro-batches as it completes during one round trip
(Little's law: the bandwidth-delay product of the pipeline); more only queue up and make gradients
staler. So, like TCP BBR, the head sizes the window from two measurements:

    window = ceil(HEADROOM * rate * rtt_min),   clamped to [floor, inflight_bound]
    rate   = min(min_s rate_s / micro, delivered)

rtt_min     the shortest of the last RTT_SAMPLES round trips of a micro-batch at the head (forward
            sent to gradient back): the path's latency and compute without queueing. Not an average:
            the queue the window itself builds would feed back into it and grow it without end.
rate_s      samples per compute-second stage s serves, summed over its replicas (each node measures
            its own and announces it in its stage record): the most the slowest stage can take.
delivered   micro-batches per second actually coming back: the best of the last few intervals. On
            machines shared by several stages (or other work) it is below the compute rates.
HEADROOM    1.25: room for jitter, and for hops that wait on a busy CPU. Less than TCP BBR's window
            gain of 2 because here every extra micro-batch in flight also makes gradients staler, and
            staleness past about one step is what async loses in loss (docs/benchmarks/async/method:
            at twice the window, +1.9% held-out against +0.4% on d192).
floor       the start size: one step's micro-batches, at least one per stage. Async never keeps fewer
            in flight than sync would; on a busy machine the round trip's compute swells far above
            its minimum, and without a floor the window would shrink with the rate it starves.

While the delivered rate still grows from one sizing to the next, the window is limited by itself,
not by the pipeline, and it grows by PROBE (x1.5) instead, up to the compute-rate window; every
PROBE_EVERY sizings it probes so anyway, in case the pipeline can take more than it is given.

Async also caps the window at `swarm.stale_steps` steps of micro-batches (1 by default): a gradient
is then at most about one step late at the head, PipeDream-2BW's regime, where the delay-aware
correction kept held-out within 0.3% of sync (or better) at equal steps on four configs; at 1.9 steps
it was 2.8-3.6% worse on three of them (docs/benchmarks/async/method). A link whose round trip is
longer than a step's compute then costs throughput rather than loss.

sync flushes every step, so it never has more than one step's micro-batches in flight: auto keeps
all of them in flight (GPipe). Staleness (async): a micro-batch is about window / (micro-batches
per step) optimizer steps stale, so with more micro-batches per step the same window is fewer steps
stale.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable

from pmnode.errors import PmnodeError

HEADROOM = 1.25  # the window over the bandwidth-delay product (see above)
RTT_SAMPLES = 256  # recent round trips whose shortest counts
PROBE = 1.5
GROWING = 1.1  # delivered rate up by this factor since the last sizing: the window was the limit
INTERVALS = 5  # recent delivery-rate intervals whose best counts
PROBE_EVERY = 4  # sizings between probes for more capacity (the pipeline's may have grown)


def stale_bound(limit: int, start: int, stale_steps: float, n_micro: int) -> int:
    """async auto: the most in flight, `stale_steps` steps of micro-batches (gradients about that many
    steps late at the head), never under the start size nor over `limit` (inflight_bound)."""
    return min(limit, max(start, math.ceil(stale_steps * n_micro)))


def auto_window(rtt_min: float, rate: float, bound: int, headroom: float = HEADROOM) -> int:
    """The window that covers `rtt_min` seconds at `rate` micro-batches/s."""
    if rate <= 0 or rtt_min <= 0 or not math.isfinite(rtt_min):
        return 1
    return max(1, min(bound, math.ceil(headroom * rate * rtt_min)))


class InflightSizer:
    """Round trips and completions seen at the head, and the window they call for."""

    def __init__(self, micro: int, bound: int, start: int):
        self.micro, self.bound = micro, bound
        self.size = self.floor = max(1, min(start, bound))
        self.rtts: deque[float] = deque(maxlen=RTT_SAMPLES)
        self.done = 0  # micro-batches back since the last sizing
        self.rates: deque[float] = deque(maxlen=INTERVALS)
        self.last_rate = 0.0
        self.last_time: float | None = None
        self.sizings = 0

    def observe(self, rtt: float) -> None:
        self.rtts.append(rtt)
        self.done += 1

    @property
    def rtt_min(self) -> float:
        return min(self.rtts, default=math.inf)

    def update(self, stage_rates: list[float], now: float) -> int:
        """The new size; `stage_rates` in samples/s (0: a stage that has not measured itself)."""
        if self.last_time is None or now <= self.last_time:
            self.last_time, self.done = now, 0
            return self.size
        self.rates.append(self.done / (now - self.last_time))
        self.last_time, self.done = now, 0
        delivered = max(self.rates)
        known = [r for r in stage_rates if r > 0]
        compute = min(known) / max(self.micro, 1) if known and len(known) == len(stage_rates) else math.inf
        ceiling = auto_window(self.rtt_min, compute, self.bound) if math.isfinite(compute) else self.bound
        self.sizings += 1
        if delivered > GROWING * self.last_rate or self.sizings % PROBE_EVERY == 0:
            self.size = min(ceiling, math.ceil(self.size * PROBE))
        else:
            self.size = min(ceiling, auto_window(self.rtt_min, delivered, self.bound))
        self.size = max(self.floor, self.size)
        self.last_rate = delivered
        return self.size


class Window:
    """The micro-batches in flight: at most `size` (resizable), their losses, and the first failure
    (never dropped: a lost micro-batch would skew the step)."""

    def __init__(self, size: int):
        self.size, self.busy = size, 0
        self.cond = asyncio.Condition()
        self.tasks: set[asyncio.Task[None]] = set()
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
