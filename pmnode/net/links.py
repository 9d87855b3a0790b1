"""Measured links: per downstream replica, how fast a call through it comes back.

A replica's own announced throughput says how fast it computes; it says nothing of the link to it. A
relayed replica, or one on a slow or far link, answers later for the same compute, so routing
(net.routing.choose_peer) weighs each replica by the slower of the two: its compute rate and the
samples/s this node measured on its calls to it. Round trips include everything downstream of that
replica, which is the same for every replica of a stage, so they compare fairly.

A measurement goes stale: it is only renewed by calls, and a replica that measured slow once (a
busy moment) would get no calls to measure it again and keep its low rate for ever, every call
piling onto the others (seen on a loaded machine: one tail replica of two served 79% of a sync
run). After `ttl` seconds without a call a link counts as not measured, and the replica is judged
by its announced compute rate until a call measures it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel


class Link(BaseModel):
    rtt_s: float  # smoothed seconds per call
    samples_per_s: float  # smoothed samples per second of call time
    calls: int = 1
    at: float = 0.0  # when the last call was measured (the caller's clock)


class LinkStats:
    """Exponentially smoothed round trips and rates, per peer; `alpha` weighs the newest call."""

    def __init__(self, alpha: float = 0.3, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.alpha, self.ttl, self.clock = alpha, ttl, clock
        self.links: dict[str, Link] = {}

    def observe(self, peer: str, seconds: float, samples: int) -> None:
        seconds = max(seconds, 1e-6)
        rate = samples / seconds
        old = self.links.get(peer)
        if old is None or self.clock() - old.at > self.ttl:  # none, or stale: start afresh
            self.links[peer] = Link(rtt_s=seconds, samples_per_s=rate, at=self.clock())
            return
        old.at = self.clock()
        a = self.alpha
        old.rtt_s = (1 - a) * old.rtt_s + a * seconds
        old.samples_per_s = (1 - a) * old.samples_per_s + a * rate
        old.calls += 1

    def forget(self, peer: str) -> None:
        """A failed route: its next calls measure it afresh (a new circuit, another path)."""
        self.links.pop(peer, None)

    def rates(self) -> dict[str, float]:
        """Measured rates, of links called within the last `ttl` seconds."""
        now = self.clock()
        return {p: link.samples_per_s for p, link in self.links.items() if now - link.at <= self.ttl}
