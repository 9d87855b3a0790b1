"""`swarm.max_inflight: auto`: the window the formula gives for an emulated round trip, and the
resizable in-flight window of the head."""

from __future__ import annotations

import asyncio
import math

import pytest

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.swarm.window import HEADROOM, InflightSizer, Window, auto_window, stale_bound


def emulated_rtt(stages: int, latency: float, compute: float) -> float:
    """One micro-batch's round trip with `latency` one way per link: stages-1 links, there and back,
    plus each stage's forward and backward compute."""
    return 2 * (stages - 1) * latency + stages * compute


def test_auto_window_is_rate_times_round_trip() -> None:
    rtt = emulated_rtt(4, 0.050, 0.002)  # 50 ms links, 4 stages: 0.308 s
    assert auto_window(rtt, rate=100.0, bound=256) == math.ceil(HEADROOM * 100 * rtt) == 39
    assert auto_window(rtt, rate=100.0, bound=16) == 16  # the bound holds
    assert auto_window(emulated_rtt(4, 0.100, 0.002), rate=100.0, bound=256) == 77
    assert auto_window(math.inf, rate=100.0, bound=64) == 1  # nothing measured: one at a time
    assert auto_window(rtt, rate=0.0, bound=64) == 1


def emulate(
    stage_rates: list[float], capacity: float, rtt: float, sizings: int, start: int = 8, bound: int = 256
) -> list[int]:
    """The sizes an emulated pipeline gets: `rtt` s round trip, `capacity` micro-batches/s at most,
    a sizing every 2 s on a fake clock, micro-batches of one sample."""
    sizer = InflightSizer(micro=1, bound=bound, start=start)
    sizes, now = [], 0.0
    sizer.update(stage_rates, now)
    for _ in range(sizings):
        delivered = min(sizer.size / rtt, capacity)
        for _ in range(round(delivered * 2.0)):
            sizer.observe(rtt)
        now += 2.0
        sizes.append(sizer.update(stage_rates, now))
    return sizes


def test_auto_picks_the_formula_window_for_an_emulated_rtt() -> None:
    rtt = emulated_rtt(4, 0.050, 0.002)
    expect = auto_window(rtt, 100.0, 256)  # 39: 1.25 x 100/s x 0.308 s
    # Stages that could each serve 400/s, but the pipeline delivers 100/s (a shared machine):
    sizes = emulate([400.0, 800.0, 500.0, 600.0], capacity=100.0, rtt=rtt, sizings=11)
    # The window is the limit: it grows while the rate does, overshoots, then settles on the formula
    # (every 4th sizing probes 1.5x higher and comes back).
    assert sizes == [12, 18, 27, 41, 62, expect, expect, 59, expect, expect, expect]
    # The slowest stage's compute rate caps it: 50 samples/s -> 1.25 x 50 x 0.308 = 20.
    capped = emulate([400.0, 50.0, 500.0, 600.0], capacity=100.0, rtt=rtt, sizings=12)
    assert max(capped) == auto_window(rtt, 50.0, 256) == 20 and capped[-1] == 20


def test_sizer_keeps_the_shortest_round_trip() -> None:
    sizer = InflightSizer(micro=1, bound=256, start=8)
    assert sizer.update([100.0, 100.0], 0.0) == 8  # nothing measured yet: the start size
    for rtt in (0.9, 0.3, 0.5):  # the queue the window builds only adds to the round trip
        sizer.observe(rtt)
    assert sizer.rtt_min == 0.3


def test_window_resizes() -> None:
    async def main() -> list[int]:
        w = Window(2)
        gate = asyncio.Event()
        seen: list[int] = []

        async def work() -> float:
            await gate.wait()
            return 1.0

        for _ in range(2):
            await w.acquire()
            w.start(work)
        third = asyncio.create_task(w.acquire())
        await asyncio.sleep(0.01)
        seen.append(int(third.done()))  # the window is full
        await w.resize(3)
        await asyncio.sleep(0.01)
        seen.append(int(third.done()))  # a larger window lets it in at once
        w.start(work)
        await w.resize(1)
        gate.set()
        await w.drain()
        seen.append(w.busy)
        assert w.take_loss() == 1.0
        return seen

    assert asyncio.run(main()) == [0, 1, 0]


def test_window_reports_the_first_failure() -> None:
    async def main() -> None:
        w = Window(1)

        async def fail() -> float:
            raise RuntimeError("route lost")

        await w.acquire()
        w.start(fail)
        await w.drain()

    with pytest.raises(PmnodeError, match="route lost"):
        asyncio.run(main())


def test_async_auto_keeps_at_most_one_step_in_flight() -> None:
    cfg = RunConfig.model_validate({})
    assert cfg.swarm.stale_steps == 1.0
    assert stale_bound(256, start=8, stale_steps=1.0, n_micro=8) == 8  # one step: 8 micro-batches
    assert stale_bound(256, start=8, stale_steps=2.5, n_micro=8) == 20
    assert stale_bound(256, start=4, stale_steps=1.0, n_micro=2) == 4  # never under the start size
    assert stale_bound(16, start=8, stale_steps=4.0, n_micro=8) == 16  # nor over inflight_bound


def test_config_accepts_auto() -> None:
    cfg = RunConfig.model_validate({"swarm": {"max_inflight": "auto", "inflight_bound": 96}})
    assert cfg.swarm.inflight_limit == 96
    assert RunConfig.model_validate({"swarm": {"max_inflight": 12}}).swarm.inflight_limit == 12
    with pytest.raises(ValueError):
        RunConfig.model_validate({"swarm": {"max_inflight": 0}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"swarm": {"max_inflight": "many"}})


def test_auto_never_goes_below_one_step() -> None:
    """An unshaped link on a busy machine: the shortest round trip is 20 ms, but the pipeline delivers
    only 10/s; the formula (2 x 10 x 0.02 = 1) would starve it, the floor keeps the start size."""
    sizer = InflightSizer(micro=1, bound=256, start=8)
    now = 0.0
    sizer.update([500.0], now)
    for _ in range(6):
        sizer.observe(0.02)
        for _ in range(19):
            sizer.observe(0.5)
        now += 2.0
        assert sizer.update([500.0], now) >= 8
    assert sizer.size == 8


def delivered(window: int, capacity: float, rtt: float) -> float:
    """Micro-batches/s a fixed window gets through the emulated pipeline (Little's law, capped)."""
    return min(window / rtt, capacity)


def test_auto_is_the_default() -> None:
    sw = RunConfig.model_validate({}).swarm
    assert sw.max_inflight == "auto" and sw.inflight_limit == sw.inflight_bound == 256


def test_auto_does_not_slow_an_unlimited_link() -> None:
    """Unshaped links: the round trip is compute only (4 stages x 2 ms), far below one step's worth of
    micro-batches at the pipeline's rate, so auto stays at its start (one step, at least one per
    stage), never below the old fixed default of 4, and delivers what the pipeline can."""
    rtt, capacity = emulated_rtt(4, 0.0, 0.002), 100.0  # 8 ms; the bandwidth-delay product is 0.8
    sizes = emulate([400.0, 400.0, 400.0, 400.0], capacity, rtt, sizings=12, start=8)
    assert sizes == [8] * 12  # never above what covers the round trip, never below the floor
    assert delivered(min(sizes), capacity, rtt) == delivered(4, capacity, rtt) == capacity


def test_auto_covers_a_slow_links_round_trip() -> None:
    """80 Mbit/s + 50 ms links: the round trip (308 ms) needs 100/s x 0.308 = 31 in flight, and auto
    keeps 1.25 x that = 39. The ramp (x1.5 per sizing while the delivered rate grows) passes it in 4
    sizings (8 s), overshoots once and settles; from then on the pipeline runs at its capacity, where
    the old fixed 4 got 13/s."""
    rtt, capacity = emulated_rtt(4, 0.050, 0.002), 100.0
    sizes = emulate([400.0, 400.0, 400.0, 400.0], capacity, rtt, sizings=12, start=8)
    assert sizes[:5] == [12, 18, 27, 41, 62]
    assert min(sizes[5:]) == auto_window(rtt, capacity, 256) == 39
    assert delivered(sizes[-1], capacity, rtt) == capacity
    assert delivered(4, capacity, rtt) == pytest.approx(4 / 0.308)  # 13/s: 0.13 of capacity


def test_auto_never_exceeds_its_bound() -> None:
    """A round trip that would call for 616 in flight (1 s links, 100/s): held at inflight_bound."""
    sizes = emulate([400.0] * 4, 100.0, emulated_rtt(4, 0.5, 0.002), sizings=20, start=8, bound=96)
    assert max(sizes) == sizes[-1] == 96
