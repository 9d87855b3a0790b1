"""`pmnode local-swarm --churn MIN-MAX`: replicas leave and join while the swarm trains."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from pmnode.swarm.procs import Proc
from pmnode.swarm.report import NodeSummary


class Churn:
    """`--churn`: every MIN-MAX s a replica leaves (SIGKILL and SIGINT in turn) or a new one joins.

    A leave takes a random replica of a stage that has two or more that have been up a while (a
    joiner may still be catching up), so no stage is ever emptied; a join goes to the stage with
    the fewest. The head is never touched: it owns the data.
    """

    def __init__(
        self,
        gaps: tuple[float, float],
        stages: int,
        replicas: int,
        spawn: Callable[[int, int], Proc],
        others: list[Proc],
        console: Console,
    ):
        self.gaps, self.stages, self.spawn, self.others, self.console = gaps, stages, spawn, others, console
        self.rng = random.Random()
        self.next_r = replicas  # replica numbers of joiners, so their names and files never collide
        self.turn, self.leaves, self.joins = 0, 0, 0
        self.due = time.monotonic() + self.rng.uniform(*gaps)

    def _live(self, stage: int) -> list[Proc]:
        return [o for o in self.others if o.stage == stage and o.p.poll() is None]

    def _settled(self, stage: int) -> list[Proc]:
        grace = max(10.0, self.gaps[0])
        return [o for o in self._live(stage) if time.monotonic() - o.started >= grace]

    def tick(self) -> None:
        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + self.rng.uniform(*self.gaps)
        if self.turn % 2 == 0:
            full = [s for s in range(1, self.stages) if len(self._settled(s)) >= 2]
            if full:
                victim = self.rng.choice(self._settled(self.rng.choice(full)))
                sig = (signal.SIGKILL, signal.SIGINT)[(self.turn // 2) % 2]
                self.others.remove(victim)  # gone on purpose: not a crash of the swarm
                victim.signal(sig)
                self.leaves += 1
                self.console.print(f"churn: {victim.name} leaves ({signal.Signals(sig).name})")
        else:
            stage = min(range(1, self.stages), key=lambda s: (len(self._live(s)), self.rng.random()))
            node = self.spawn(stage, self.next_r)
            self.next_r += 1
            self.others.append(node)
            self.joins += 1
            self.console.print(f"churn: {node.name} joins")
        self.turn += 1

    def report(self, workdir: Path) -> None:
        """Samples lost or counted twice, summed over the steps of every node that left a summary."""
        off = sum(
            NodeSummary.model_validate_json(p.read_text()).samples_off for p in workdir.glob("node-*.json")
        )
        self.console.print(
            f"churn: {self.leaves} leaves, {self.joins} joins; samples lost or counted twice over every "
            f"node's steps: {off}"
        )
