"""The simulator fed with what a real local swarm measured, and the one constant fitted across runs.

Each node's forward and backward times per micro-batch are its own measured wall times. What the
compute thread does not measure is the event loop: encoding, decoding and checking every message,
and libp2p. That cost is one constant for all runs, `msg_cpu` CPU seconds per message end, scaled
per node by how much slower than its CPU time its compute thread ran in that run (the cores were
shared: by the swarm's own processes and by other work on the machine).
"""

from __future__ import annotations

import statistics

from pydantic import BaseModel

from benchmarks.calibrate import Measured, NodeTimes, run_config
from pmnode.core.train import config_for
from pmnode.net.shaping import parse_bandwidth, parse_latency
from pmnode.plan.shapes import stage_shapes
from pmnode.plan.sync import SyncSettings, stage_loads
from pmnode.sim.model import NodeSpec, SimResult, StageSpec, SwarmSpec, SyncSpec
from pmnode.sim.swarm import SwarmSim


def _per_mb(total: float, n: int) -> float:
    return total / n if n else 0.0


def _step_s(n: NodeTimes, steps: int) -> float:
    c = n.compute
    return max(c.busy_s - c.forward_s - c.backward_s, 0.0) / max(steps, 1)


def _sync_specs(m: Measured) -> list[SyncSpec | None]:
    """Each stage's replica-sync rounds as the run's config makes them (the plan's prices), so a run
    with heads or replicas is simulated with the exchanges it made."""
    s = m.spec
    if s.heads < 2 and s.replicas < 2:
        return [None] * s.stages
    cfg = run_config(s)
    sw = cfg.swarm
    settings = SyncSettings(
        replica_sync=cfg.replica_sync,
        schedule=sw.schedule,
        average_period=sw.average_period,
        average_compression=sw.average_compression,
    )
    loads = stage_loads(stage_shapes(config_for(cfg, s.codec)[0]), s.heads, s.replicas, settings)
    out: list[SyncSpec | None] = []
    for load in loads:
        if load is None:
            out.append(None)
        elif load.every_s is not None:
            out.append(SyncSpec(bytes_up=load.up_bytes, every_s=load.every_s))
        else:
            mode = "commit" if load.in_commit else ("blocking" if load.blocking else "overlap")
            out.append(SyncSpec(bytes_up=load.up_bytes, every_steps=load.every_steps, mode=mode))
    return out


def spec_from_measured(
    m: Measured,
    msg_cpu: float,
    hop_s: float = 0.0,
    shared: bool = False,
    late_s: float = 0.0,
    byte_cpu: float = 0.0,
) -> SwarmSpec:
    s = m.spec
    bw, lat = parse_bandwidth(s.bandwidth), parse_latency(s.latency)
    # The head's other work is mostly loading the data once; its step costs what the others' do.
    others = [_step_s(n, s.steps) for n in m.nodes if n.stage > 0]
    stages = []
    syncs = _sync_specs(m)
    for st in range(s.stages):
        nodes = sorted((n for n in m.nodes if n.stage == st), key=lambda n: n.replica)
        fwd = statistics.mean(_per_mb(n.compute.forward_s, n.compute.forwards) for n in nodes)
        bwd = statistics.mean(_per_mb(n.compute.backward_s, n.compute.backwards) for n in nodes)
        step = statistics.median(others) if st == 0 else statistics.mean(_step_s(n, s.steps) for n in nodes)
        specs = []
        for n in nodes:
            own = _per_mb(n.compute.forward_s, n.compute.forwards) + _per_mb(
                n.compute.backward_s, n.compute.backwards
            )
            inflation = n.compute.busy_s / n.compute.cpu_s if n.compute.cpu_s > 0 else 1.0
            specs.append(
                NodeSpec(
                    bandwidth=bw,
                    latency=lat,
                    speed=(fwd + bwd) / own if own else 1.0,
                    msg_s=msg_cpu * inflation,
                    byte_s=byte_cpu * inflation,
                )
            )
        sync = syncs[st] if len(specs) > 1 else None
        stages.append(StageSpec(fwd_s=fwd, bwd_s=bwd, step_s=step, nodes=specs, sync=sync))
    return SwarmSpec(
        stages=stages,
        schedule=s.schedule,
        max_inflight=s.inflight,
        micro_batches_per_step=m.micro_batches_per_step,
        tokens_per_micro_batch=m.tokens_per_micro_batch,
        fwd_bytes_per_token=m.fwd_bytes_per_token,
        bwd_bytes_per_token=m.bwd_bytes_per_token,
        hop_s=hop_s,
        commit_latency=False,  # the local swarm shapes data calls only: its commits are not delayed
        link_per_peer=True,  # and it shapes each peer's link on its own
        loop_shares_compute=shared,
        shaped_late_s=late_s,
    )


class Fitted(BaseModel):
    """The constants fitted across all calibration runs."""

    msg_cpu: float  # CPU seconds of event-loop work per message end
    shared: bool  # the event loop takes turns with the compute thread (one interpreter lock)
    late_s: float = 0.0  # how late a message that waited on an emulated link is woken
    byte_cpu: float = 0.0  # CPU seconds per replica-sync byte through the RPC stack (pmnode.sim.model)


def predict(m: Measured, f: Fitted, steps: int = 200) -> SimResult:
    return SwarmSim(spec_from_measured(m, f.msg_cpu, 0.0, f.shared, f.late_s, f.byte_cpu)).run(steps)


def errors(runs: list[Measured], f: Fitted) -> list[float]:
    """Relative error of each run's predicted tokens/s against the measured."""
    return [predict(m, f).tokens_per_s / m.tokens_per_s - 1 for m in runs]
