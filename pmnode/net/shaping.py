"""In-process link emulation: bandwidth and latency per peer link, per direction.

Each outgoing message to a peer is serialized onto that peer's link at `bandwidth` bytes/s after
the messages already queued on it, then arrives `latency` seconds later. Messages to one peer
queue behind each other for bandwidth but overlap in latency, as on a real link with a deep
enough TCP window. The node that sends a message waits until its emulated arrival before
handing it to libp2p, so the time shows up where a slow link would put it: the forward request
on the sender's side, the gradient reply on the server's side.

netem is not available on the machines this was built on; `scripts/netns_shaping.sh` checks the
bandwidth half against the kernel's tbf.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pmnode.errors import PmnodeError

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_bandwidth(text: str) -> float | None:
    """'80mbit' -> 1e7 bytes/s; 'unlimited' -> None. Bits, as tc writes them; 'bps' suffix for bytes."""
    t = text.strip().lower()
    if t in ("", "unlimited", "inf", "none"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)", t)
    if not m or float(m.group(1)) <= 0:
        raise PmnodeError(f"bad bandwidth {text!r}: use e.g. 80mbit, 1gbit, 500kbit, 10mbps or unlimited")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    return value / 8 if m.group(3) == "bit" else value


def parse_latency(text: str) -> float:
    """'50ms' -> 0.05 seconds; '0' -> 0."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|us)?", t)
    if not m:
        raise PmnodeError(f"bad latency {text!r}: use e.g. 50ms, 0.2s or 0")
    scale = {"ms": 1e-3, "s": 1.0, "us": 1e-6, None: 1e-3}[m.group(2)]
    return float(m.group(1)) * scale


def format_bandwidth(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "unlimited"
    bits = bytes_per_s * 8
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


@dataclass
class LinkShaper:
    """Emulated links from this process to each peer. bandwidth in bytes/s (None: unlimited)."""

    bandwidth: float | None = None
    latency: float = 0.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _free_at: dict[str, float] = field(default_factory=dict)  # when each peer's link is idle again
    delayed_s: float = 0.0  # total time messages waited here, for reports

    @property
    def active(self) -> bool:
        return self.bandwidth is not None or self.latency > 0

    def arrival(self, peer: str, nbytes: int) -> float:
        """Reserve the link for one message now; return when it arrives at the peer."""
        now = self.clock()
        start = max(now, self._free_at.get(peer, now))
        done = start + (nbytes / self.bandwidth if self.bandwidth else 0.0)
        self._free_at[peer] = done
        return done + self.latency

    async def transmit(self, peer: str, nbytes: int) -> None:
        if not self.active:
            return
        wait = self.arrival(peer, nbytes) - self.clock()
        if wait > 0:
            self.delayed_s += wait
            await self.sleep(wait)

    def describe(self) -> str:
        return f"{format_bandwidth(self.bandwidth)}, {self.latency * 1e3:g} ms"
