"""The in-process link emulator, on a fake clock: bandwidth queues, latency overlaps."""

from __future__ import annotations

import asyncio

import pytest

from pmnode.errors import PmnodeError
from pmnode.net.shaping import LinkShaper, format_bandwidth, parse_bandwidth, parse_latency


@pytest.mark.parametrize(
    "text, expect",
    [("80mbit", 1e7), ("1gbit", 1.25e8), ("500kbit", 62_500), ("10mbps", 1e7), ("unlimited", None)],
)
def test_parse_bandwidth(text: str, expect: float | None) -> None:
    assert parse_bandwidth(text) == expect
    assert format_bandwidth(expect) == (text if "bit" in text or text == "unlimited" else "80mbit")


@pytest.mark.parametrize("bad", ["80", "fast", "-1mbit", "0mbit", "80mb"])
def test_bad_bandwidth_is_a_clear_error(bad: str) -> None:
    with pytest.raises(PmnodeError, match="bad bandwidth"):
        parse_bandwidth(bad)


def test_parse_latency() -> None:
    assert parse_latency("50ms") == pytest.approx(0.05)
    assert parse_latency("0.2s") == pytest.approx(0.2)
    assert parse_latency("0") == 0
    with pytest.raises(PmnodeError, match="bad latency"):
        parse_latency("soon")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        self.now += dt


def test_arrivals_queue_for_bandwidth_and_overlap_in_latency() -> None:
    clock = FakeClock()
    shaper = LinkShaper(bandwidth=1e6, latency=0.05, clock=clock, sleep=clock.sleep)
    # Three 100 kB messages to one peer at t=0: 0.1 s each on the wire, one 50 ms latency each.
    assert [shaper.arrival("a", 100_000) for _ in range(3)] == pytest.approx([0.15, 0.25, 0.35])
    # Another peer has its own link.
    assert shaper.arrival("b", 100_000) == pytest.approx(0.15)
    # An idle link starts fresh: no credit builds up while nothing is sent.
    clock.now = 10.0
    assert shaper.arrival("a", 50_000) == pytest.approx(10.1)


def test_transmit_waits_until_arrival() -> None:
    clock = FakeClock()
    shaper = LinkShaper(bandwidth=1e7, latency=0.05, clock=clock, sleep=clock.sleep)
    asyncio.run(shaper.transmit("a", 1_000_000))  # 80 Mbit/s: 0.1 s + 50 ms
    assert clock.now == pytest.approx(0.15) and shaper.delayed_s == pytest.approx(0.15)
    free = LinkShaper(clock=clock, sleep=clock.sleep)
    assert not free.active
    asyncio.run(free.transmit("a", 10**9))
    assert clock.now == pytest.approx(0.15)
