"""A run's plan: its stage costs on a device (or measured times), the closed form, the simulator's
figure, the replicas' sync traffic and which sync fits the link, and the largest k that keeps every
stage compute-bound."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from pmnode.config import RunConfig
from pmnode.core.train import config_for, parse_spec
from pmnode.errors import ConfigError
from pmnode.plan.advice import RankAdvice, advise, recommended
from pmnode.plan.closed import ClosedForm, PlanInputs, closed_form
from pmnode.plan.costs import StageCost, codec_bytes, stage_costs
from pmnode.plan.shapes import stage_shapes
from pmnode.plan.sync import SyncLoad, SyncSettings, Topology, stage_loads
from pmnode.plan.sync_advice import SyncAdvice, advise_sync
from pmnode.sim.model import NodeSpec, SimResult, StageSpec, SwarmSpec, SyncSpec
from pmnode.sim.swarm import SwarmSim
from pmnode.swarm.report import NodeSummary

SIM_MICRO_BATCHES = 2400  # what the plan's simulation runs, about


class Plan(BaseModel):
    config: str
    codec: str
    device: str  # what the compute times came from
    stages_n: int
    heads: int
    replicas: int
    bandwidth: float | None
    latency: float
    schedule: str
    max_inflight: int
    tokens_per_step: int  # of the swarm: every head drives train.batch_size of a step
    replica_sync: SyncSettings
    replica_sync_summary: str
    costs: list[StageCost]
    fwd_s_per_token: list[float]
    bwd_s_per_token: list[float]
    closed: ClosedForm
    simulated: SimResult
    max_k_compute_bound: int | None  # the largest subspace k whose links keep up with compute
    advice: RankAdvice | None = None  # the lowest measured long-run cost the link carries at that rate
    sync_advice: SyncAdvice | None = None  # the replica sync that fits the link (more than one node)
    gpu_memory_gb: float | None = None  # the device's, to set the stages' state against

    @property
    def memory_gb(self) -> list[float]:
        """Each stage's training memory at the plan's precision (pmnode.core.sizing)."""
        return [c.memory_bytes / 1e9 for c in self.costs]


def device_times(costs: list[StageCost], flops_per_s: float) -> tuple[list[float], list[float]]:
    return [c.flops_fwd_per_token / flops_per_s for c in costs], [
        c.flops_bwd_per_token / flops_per_s for c in costs
    ]


def measured_times(path: Path, cfg: RunConfig) -> tuple[list[float], list[float]]:
    """Per-token times of every stage from a run's node summaries (`--summary-json` of `pmnode join`,
    or the node-*.json a local swarm leaves in its workdir): a directory of them or one file per stage."""
    files = sorted(path.glob("node-*.json")) if path.is_dir() else [path]
    by_stage: dict[int, NodeSummary] = {}
    for f in files:
        try:
            s = NodeSummary.model_validate_json(f.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--measured {f}: not a node summary ({type(e).__name__})") from None
        by_stage.setdefault(s.stage, s)
    if sorted(by_stage) != list(range(cfg.n_stages)):
        raise ConfigError(
            f"--measured {path}: has stages {sorted(by_stage)}, the plan has {cfg.n_stages}; pass --stages"
        )
    tok = cfg.train.micro * cfg.train.seq_len
    fwd, bwd = [], []
    for i in range(cfg.n_stages):
        c = by_stage[i].compute
        if not c.backwards:
            raise ConfigError(f"--measured: stage {i} ran no backward; measure a run that trained")
        fwd.append(c.forward_s / c.forwards / tok if c.forwards else 0.0)
        bwd.append(c.backward_s / c.backwards / tok)
    return fwd, bwd


def sync_spec(load: SyncLoad | None, most_steps: int) -> SyncSpec | None:
    """A stage's rounds for the simulator, every at most `most_steps` steps (see `simulate`)."""
    if load is None:
        return None
    if load.every_s is not None:
        return SyncSpec(bytes_up=load.up_bytes, every_s=load.every_s)
    assert load.every_steps is not None
    every = min(load.every_steps, most_steps)
    mode = "commit" if load.in_commit else ("blocking" if load.blocking else "overlap")
    return SyncSpec(bytes_up=load.up_bytes * every / load.every_steps, every_steps=every, mode=mode)


def simulate(p: PlanInputs, micro_batches: int = SIM_MICRO_BATCHES) -> SimResult:
    """The simulator's figure for the plan, over about `micro_batches` (4 to 60 steps: a sync step
    repeats itself, and a plan must come back in seconds). Rounds every H steps are simulated every k
    steps with k/H of their bytes, k small enough for a few rounds to run: the same share of the
    link, and a round that does not land within k steps is one that would not within H."""
    m = p.tokens_per_micro_batch
    steps = min(60, max(4, math.ceil(micro_batches / (p.heads * p.micro_batches_per_step))))
    k = max(1, steps // 30)  # rounds every k steps: enough of them for a steady rate
    last = len(p.costs) - 1
    stages = [
        StageSpec(
            fwd_s=0.0 if i == last else m * p.fwd_s_per_token[i],
            bwd_s=m * (p.bwd_s_per_token[i] + (p.fwd_s_per_token[i] if i == last else 0.0)),
            nodes=[NodeSpec(bandwidth=p.bandwidth, latency=p.latency)] * p.nodes(i),
            sync=sync_spec(p.load(i), k),
        )
        for i in range(len(p.costs))
    ]
    spec = SwarmSpec(
        stages=stages,
        schedule=p.schedule,
        max_inflight=p.max_inflight,
        micro_batches_per_step=p.micro_batches_per_step,
        tokens_per_micro_batch=m,
        fwd_bytes_per_token=p.costs[0].bytes_fwd_per_token,
        bwd_bytes_per_token=p.costs[-1].bytes_bwd_per_token,
        commit_round_trips=p.commit_round_trips,
    )
    return SwarmSim(spec).run(steps)


def max_k(cfg: RunConfig, codec: str, bandwidth: float | None, compute_rate: float) -> int | None:
    """The largest k whose boundary bytes the slowest uplink carries at the swarm's compute rate."""
    kind = parse_spec(codec)[0]
    spec = kind if kind.startswith("subspace") else "subspace"
    d = cfg.model.d_model
    if bandwidth is None:
        return d
    for k in range(d, 0, -1):
        fwd, bwd, _ = codec_bytes(cfg, f"{spec}@{k}")
        if bandwidth / max(fwd, bwd) >= compute_rate:  # the head's single uplink is the narrowest
            return k
    return None


def make_plan(
    cfg: RunConfig,
    codec: str,
    *,
    fwd_bwd: tuple[list[float], list[float]],
    device: str,
    bandwidth: float | None,
    latency: float,
    replicas: int,
    max_inflight: int,
    heads: int = 1,
    topology: Topology = "all-gather",
    gpu_memory_gb: float | None = None,
) -> Plan:
    """The plan of `cfg` (its replica_sync section and swarm schedule as given: the CLI's flags are
    overrides of the config)."""
    if cfg.replica_sync.method == "grads" and cfg.swarm.schedule != "sync":
        raise ConfigError("replica_sync.method: grads runs in sync swarms only: plan it with --schedule sync")
    costs = stage_costs(cfg, codec)
    t, sw = cfg.train, cfg.swarm
    settings = SyncSettings(
        replica_sync=cfg.replica_sync,
        schedule=sw.schedule,
        average_period=sw.average_period,
        average_compression=sw.average_compression,
        topology=topology,
    )
    shapes = stage_shapes(config_for(cfg, codec)[0])  # the model this codec trains
    inputs = PlanInputs(
        costs=costs,
        fwd_s_per_token=fwd_bwd[0],
        bwd_s_per_token=fwd_bwd[1],
        bandwidth=bandwidth,
        latency=latency,
        heads=heads,
        replicas=replicas,
        max_inflight=max_inflight,
        schedule=sw.schedule,
        tokens_per_micro_batch=t.micro * t.seq_len,
        micro_batches_per_step=max(1, t.batch_size // t.micro),
        sync=stage_loads(shapes, heads, replicas, settings),
    )
    closed = closed_form(inputs)
    compute = min(r.compute_tokens_per_s for r in closed.stages)
    return Plan(
        config=cfg.name,
        codec=codec,
        device=device,
        stages_n=cfg.n_stages,
        heads=heads,
        replicas=replicas,
        bandwidth=bandwidth,
        latency=latency,
        schedule=sw.schedule,
        max_inflight=max_inflight,
        tokens_per_step=inputs.tokens_per_step,
        replica_sync=settings,
        replica_sync_summary=settings.describe(),
        costs=costs,
        fwd_s_per_token=fwd_bwd[0],
        bwd_s_per_token=fwd_bwd[1],
        closed=closed,
        simulated=simulate(inputs),
        gpu_memory_gb=gpu_memory_gb,
        max_k_compute_bound=max_k(cfg, codec, bandwidth, compute if math.isfinite(compute) else 0.0),
        advice=recommended(advise(cfg, bandwidth, compute)) if bandwidth and math.isfinite(compute) else None,
        sync_advice=advise_sync(inputs, shapes, settings),
    )
