"""A finished simulation summarised: tokens/s at steady state, utilisation, and what binds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pmnode.sim.model import SimResult, StageResult

if TYPE_CHECKING:
    from pmnode.sim.swarm import SwarmSim

BUSY = 0.85  # a resource this busy is the one that binds


def summarise(sim: SwarmSim, steps: int, edge: float = 0.1) -> SimResult:
    """Rates over the steps between the first and last `edge` shares: the pipeline filling up at the
    start, and at the end a head that sends nothing new and so returns the last ones faster."""
    s, ends = sim.spec, sim.step_ends
    n = len(ends)
    a = min(max(1, int(n * edge)), n - 1) if n > 1 else 0
    b = max(n - int(n * edge), a + 1) if n > 1 else n
    t0 = ends[a - 1] if a else 0.0
    span = max(ends[b - 1] - t0, 1e-12) if ends else 1e-12
    tokens = (b - a) * sim.micro_batches_per_step * s.tokens_per_micro_batch
    total = max(sim.eng.now, 1e-12)
    stages, worst = [], ("", 0.0)
    for i, nodes in enumerate(sim.nodes):
        alive = [n for n in nodes if n.compute.up]
        busy = sum(n.compute.busy_s for n in nodes)
        util = busy / (max(len(alive), 1) * total)
        rounds, round_s, waited = sim.rounds.stage_figures(i, total)
        served = sum(n.served for n in nodes)
        stages.append(
            StageResult(
                stage=i,
                nodes=len(alive),
                utilisation=round(util, 4),
                micro_batches=served,
                busiest_share=round(max((n.served for n in nodes), default=0) / max(served, 1), 4),
                sync_rounds=rounds,
                sync_round_s=round(round_s, 4),
                sync_waited=round(waited, 4),
            )
        )
        if util > worst[1]:
            worst = (f"compute, stage {i}", util)
        if waited + util > worst[1] and waited > util:  # replicas mostly waiting for their rounds
            worst = (f"replica sync, stage {i}", waited + util)
    for nodes in sim.nodes:
        for node in nodes:
            for (to, _), busy in node.link_busy.items():
                if busy / total > worst[1]:
                    worst = (f"link {node.stage}->{to}", busy / total)
            sync = sim.rounds.sync_s[node.name]
            # one uplink: the rounds and the activations together, named by whichever carries more
            up = (sync + sum(node.link_busy.values())) / total
            if sync and up > worst[1] and sync / total >= 0.5 * up:
                worst = (f"replica sync, stage {node.stage}", up)
    if worst[1] < BUSY:
        worst = (
            "latency and the in-flight window" if s.schedule == "async" else "pipeline drain and commit",
            0,
        )
    return SimResult(
        tokens_per_s=round(tokens / span, 2),
        steps=len(ends),
        seconds=round(sim.eng.now, 4),
        step_s=round(span / max(b - a, 1), 6),
        stages=stages,
        retried=sim.retried,
        binding=worst[0],
        stalled=sim.stalled,
    )
