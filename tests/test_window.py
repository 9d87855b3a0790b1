"""`swarm.max_inflight: auto`: the window the formula gives for an emulated round trip, and the
resizable in-flight window of the head."""

from __future__ import annotations

import asyncio
import math

import pytest

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.swarm.window import GAIN, InflightSizer, Window, auto_window


def emulated_rtt(stages: int, latency: float, compute: float) -> float:
    """One micro-batch's round trip with `latency` one way per link: stages-1 links, there and back,
    plus each stage's forward and backward compute."""
    return 2 * (stages - 1) * latency + stages * compute


def test_auto_window_is_rate_times_round_trip() -> None:
    rtt = emulated_rtt(4, 0.050, 0.002)  # 50 ms links, 4 stages: 0.308 s
    rates = [900.0, 400.0, 650.0, 700.0]  # samples/s per stage; the second is the bottleneck
    # 400 samples/s in micro-batches of 2 = 200/s; x 0.308 s = 61.6 in flight; x gain 2 = 123.2
    assert auto_window(rtt, rates, micro=2, bound=256) == math.ceil(GAIN * 200 * rtt) == 124
    assert auto_window(rtt, rates, micro=2, bound=64) == 64  # the bound holds
    assert auto_window(emulated_rtt(4, 0.100, 0.002), rates, micro=2, bound=512) == 244
    assert auto_window(0.0, rates, micro=2, bound=64) == 1  # nothing measured: one at a time
    assert auto_window(rtt, [0.0, 0.0], micro=2, bound=64) == 1


def test_sizer_uses_the_shortest_round_trip() -> None:
    sizer = InflightSizer(micro=1, bound=256, start=8)
    assert sizer.update([100.0, 100.0]) == 8  # no round trip seen yet: the start size
    for rtt in (0.9, 0.3, 0.5):  # the queue the window builds only adds to the round trip
        sizer.observe(rtt)
    assert sizer.update([100.0, 0.0]) == 8  # a stage that has not measured its rate: keep the size
    assert sizer.update([100.0, 50.0]) == math.ceil(GAIN * 50 * 0.3) == 30


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


def test_config_accepts_auto() -> None:
    cfg = RunConfig.model_validate({"swarm": {"max_inflight": "auto", "inflight_bound": 96}})
    assert cfg.swarm.inflight_limit == 96
    assert RunConfig.model_validate({"swarm": {"max_inflight": 12}}).swarm.inflight_limit == 12
    with pytest.raises(ValueError):
        RunConfig.model_validate({"swarm": {"max_inflight": 0}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"swarm": {"max_inflight": "many"}})
