"""Replica-sync rounds on the simulated clock: every replicated stage's rounds share each node's
uplink with its activations (pmnode.plan.sync says what a round carries and how often).

A round beside compute takes the uplink the activations leave: it is paced behind them (a background
transfer), so an activation never waits for it, and every activation byte the node sends while the
round is in flight makes the round that much later. `overlap`: a replica whose next round is due
while the last has not landed waits for it (its compute thread holds); `blocking`: it waits for
every round; `commit`: the sync commit waits for every replicated stage's exchange, on links the
drained pipeline leaves free. Timed rounds (`every_s`) start on the period's grid after the last
one ended and never hold compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from pmnode.sim.model import SyncSpec

if TYPE_CHECKING:
    from pmnode.sim.swarm import SimNode, SwarmSim


@dataclass
class NodeRounds:
    in_flight: bool = False
    owed: int = 0  # rounds due while this one was in flight: each starts when the last lands
    holding: bool = False  # the replica's compute waits for its rounds
    started: float = 0.0
    end: float = 0.0  # when its last byte is serialised, as of now
    durations: list[float] = field(default_factory=list)


def _transfer_s(node: SimNode, nbytes: float) -> float:
    """A round's bytes leave at the link's rate, and no faster than the RPC stack moves them."""
    bw = node.shaper.bandwidth
    return max(nbytes / bw if bw else 0.0, nbytes * node.spec.byte_s)


class Rounds:
    def __init__(self, sim: SwarmSim) -> None:
        self.sim = sim
        self.state: dict[str, NodeRounds] = {n.name: NodeRounds() for st in sim.nodes for n in st}
        self.sync_s = {n.name: 0.0 for st in sim.nodes for n in st}  # uplink seconds of sync bytes

    def in_flight(self) -> bool:
        return any(st.in_flight for st in self.state.values())

    def _spec(self, stage: int) -> SyncSpec | None:
        spec = self.sim.spec.stages[stage].sync
        return spec if spec is not None and len(self.sim.nodes[stage]) > 1 else None

    # ---- starting rounds -------------------------------------------------------------------------
    def start_timed(self) -> None:
        for i, stage in enumerate(self.sim.nodes):
            spec = self._spec(i)
            if spec is not None and spec.every_s is not None:
                for n in stage:
                    self.sim.eng.at(spec.every_s, partial(self._timed, n, spec))

    def _timed(self, node: SimNode, spec: SyncSpec) -> None:
        assert spec.every_s is not None
        period = spec.every_s

        def landed() -> None:
            grid = (math.floor(self.sim.eng.now / period) + 1) * period
            self.sim.eng.at(grid, lambda: self._timed(node, spec))

        if node.alive:
            self._send(node, spec.bytes_up, landed)

    def on_step(self, steps: int) -> None:
        """After the swarm's `steps`-th step: the step-based rounds that are due."""
        for i, stage in enumerate(self.sim.nodes):
            spec = self._spec(i)
            if spec is None or spec.every_steps is None or spec.mode == "commit" or steps % spec.every_steps:
                continue
            for n in stage:
                if n.alive:
                    self._due(n, spec)

    def _due(self, node: SimNode, spec: SyncSpec) -> None:
        st = self.state[node.name]
        if spec.mode == "blocking":
            node.compute.hold()
            self._send(node, spec.bytes_up, node.compute.release)
        elif st.in_flight:  # the last round has not landed: the replica waits for it
            st.owed += 1
            if not st.holding:
                st.holding = True
                node.compute.hold()
        else:
            self._send(node, spec.bytes_up, lambda: None)

    def commit_wait(self) -> float:
        """sync: seconds the commit waits for the `commit` stages' exchanges (the pipeline is drained:
        the links are free)."""
        wait = 0.0
        for i, stage in enumerate(self.sim.nodes):
            spec = self._spec(i)
            if spec is None or spec.mode != "commit":
                continue
            for n in stage:
                if n.alive:
                    wire = _transfer_s(n, spec.bytes_up)
                    took = wire + n.shaper.latency
                    self.sync_s[n.name] += wire
                    self.state[n.name].durations.append(took)
                    wait = max(wait, took)
        return wait

    # ---- the transfer ----------------------------------------------------------------------------
    def on_uplink(self, node: SimNode, nbytes: float) -> None:
        """Activations went out on `node`'s uplink: a round in flight there gets that much later."""
        st = self.state[node.name]
        if st.in_flight and node.shaper.bandwidth:
            st.end += nbytes / node.shaper.bandwidth

    def _send(self, node: SimNode, nbytes: float, then: Callable[[], None]) -> None:
        eng, st = self.sim.eng, self.state[node.name]
        wire = _transfer_s(node, nbytes)
        st.in_flight, st.started, st.end = True, eng.now, eng.now + wire
        self.sync_s[node.name] += wire

        def landed() -> None:
            st.in_flight = False
            st.durations.append(eng.now - st.started)
            then()
            if st.owed:  # a round came due meanwhile: it starts now
                st.owed -= 1
                spec = self._spec(node.stage)
                assert spec is not None
                self._send(node, spec.bytes_up, lambda: None)
            if st.holding and not st.owed:  # nothing more to wait for: the replica goes on
                st.holding = False
                node.compute.release()

        def serialised() -> None:
            if eng.now < st.end - 1e-12:  # activations went first meanwhile
                eng.at(st.end, serialised)
            else:
                eng.after(node.shaper.latency, landed)

        eng.at(st.end, serialised)

    # ---- results ---------------------------------------------------------------------------------
    def stage_figures(self, stage: int, total_s: float) -> tuple[int, float, float]:
        """(rounds, mean round seconds, share of the replicas' time spent waiting for rounds)."""
        nodes = self.sim.nodes[stage]
        durations = [d for n in nodes for d in self.state[n.name].durations]
        held = sum(n.compute.held_s for n in nodes)
        mean = sum(durations) / len(durations) if durations else 0.0
        return len(durations), mean, held / (len(nodes) * max(total_s, 1e-12))
