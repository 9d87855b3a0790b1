"""A small discrete-event engine: a clock, a heap of timed callbacks, and FIFO servers.

Callbacks scheduled for the same instant run in the order they were scheduled, so a simulation
with a seeded rng is deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from itertools import count


class Engine:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = count()

    def clock(self) -> float:
        return self.now

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def after(self, dt: float, fn: Callable[[], None]) -> None:
        self.at(self.now + dt, fn)

    def run(self, until: float | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Run events in time order until none is left, the clock passes `until`, or `stop()` holds."""
        while self._heap:
            t, _, fn = self._heap[0]
            if until is not None and t > until:
                self.now = until
                return
            heapq.heappop(self._heap)
            self.now = t
            fn()
            if stop is not None and stop():
                return


class Server:
    """One job at a time, first come first served (a node's compute thread). Jobs of a server that
    went down are dropped, and so are the ones that were queued on it. A hold is a job that lasts
    until `release()` (a replica waiting for a replica-sync round to land)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.queue: deque[tuple[float | None, Callable[[], None]]] = deque()
        self.busy_until: float | None = None
        self.busy_s = 0.0  # seconds of work done, for utilisation
        self.held_s = 0.0  # seconds spent in holds (not work: not in busy_s)
        self.up = True
        self._hold: tuple[float, Callable[[], None]] | None = None  # (since, done) of the hold running
        self._released = False  # released while its hold still waited in the queue

    @property
    def load(self) -> int:
        """Jobs queued or running."""
        return len(self.queue) + (self.busy_until is not None)

    def submit(self, seconds: float, done: Callable[[], None]) -> None:
        if not self.up:
            return
        self.queue.append((seconds, done))
        if self.busy_until is None:
            self._next()

    def hold(self) -> None:
        """After the job running now, wait until `release()`: the jobs queued wait too (a replica
        that stops at its step boundary for a round to land)."""
        if not self.up:
            return
        self.queue.appendleft((None, lambda: None))
        if self.busy_until is None:
            self._next()

    def release(self) -> None:
        """End the hold running now (a hold still queued ends as soon as it starts: see `_next`)."""
        if self._hold is None:
            self._released = True
            return
        since, done = self._hold
        self._hold = None
        self.held_s += self.engine.now - since
        if self.up:
            done()
            self._next()

    def _next(self) -> None:
        if not self.queue or not self.up:
            self.busy_until = None
            return
        seconds, done = self.queue.popleft()
        if seconds is None:  # a hold
            if self._released:  # released before it started: nothing to wait for
                self._released = False
                self._hold, self.busy_until = (self.engine.now, done), self.engine.now
                self.engine.after(0.0, self.release)
                return
            self._hold, self.busy_until = (self.engine.now, done), math.inf
            return
        self.busy_until = self.engine.now + seconds
        self.busy_s += seconds

        def finish() -> None:
            if self.up:
                done()
                self._next()

        self.engine.after(seconds, finish)

    def stop(self) -> None:
        self.up = False
        self.queue.clear()
        self.busy_until = None
        self._hold = None
