"""Measure local swarms for the simulator's calibration: tokens/s and every node's compute times.

Each `RunSpec` is one real local swarm (coordinator + one process per node, links shaped in-process).
The measured rate is taken over the head's per-step lines after a warm-up and before the last step
(whose line includes the final evaluation); every node's `ComputeTimes` come from its summary JSON.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from pmnode.bench.swarm import head_lines
from pmnode.config import RunConfig, load_config
from pmnode.config.split import split_layers
from pmnode.core.train import config_for
from pmnode.net.shaping import parse_bandwidth
from pmnode.swarm.local_swarm import run_local_swarm
from pmnode.swarm.report import ComputeTimes, NodeSummary, StepLine


class RunSpec(BaseModel):
    name: str
    config: str  # a shipped config's name or a path
    stages: int
    schedule: str = "async"
    codec: str = "subspace"
    bandwidth: str = "unlimited"
    latency: str = "0ms"
    inflight: int = 4
    replicas: int = 1
    heads: int = 1  # swarm.heads: stage 0's replicas, each driving its own batches
    steps: int = 60
    warmup: int = 10  # steps left out of the measured rate (at least the in-flight window's)
    request_timeout: float = 60.0  # a slow emulated link queues micro-batches for longer than the default


class NodeTimes(BaseModel):
    stage: int
    replica: int
    compute: ComputeTimes
    samples_applied: int


class Measured(BaseModel):
    spec: RunSpec
    tokens_per_s: float
    steps_measured: int
    elapsed: list[float]  # the head's seconds at each step's line
    tokens: list[int]  # and the tokens it had launched
    tokens_per_micro_batch: int
    micro_batches_per_step: int
    fwd_bytes_per_token: float
    bwd_bytes_per_token: float
    nodes: list[NodeTimes]
    loadavg_1m: float  # the machine's load as the run ended: the cores are shared


def run_config(spec: RunSpec) -> RunConfig:
    cfg = load_config(Path(spec.config))
    cfg, _ = config_for(cfg, spec.codec)
    tail = len(split_layers(cfg.model.n_layers, spec.stages)[-1])  # free tail layers must fit the tail
    return cfg.with_overrides(
        n_stages=spec.stages,
        stage_layers=None,
        subspace={"uncompressed_tail_layers": min(cfg.subspace.uncompressed_tail_layers, tail)},
        swarm={
            "heads": spec.heads,
            "schedule": spec.schedule,
            "max_inflight": spec.inflight,
            "request_timeout": spec.request_timeout,
        },
        train={"steps": spec.steps, "eval_every": spec.steps},  # one evaluation, at the end
    )


def warmup_steps(spec: RunSpec, micro_batches_per_step: int) -> int:
    """Async counts a step's tokens when its micro-batches are sent: the first window's worth of steps
    go out at once and must be left out, or the rate is overstated."""
    return max(spec.warmup, -(-spec.inflight // micro_batches_per_step) + 4)


def steady_tokens_per_s(lines: list[StepLine], warmup: int) -> tuple[float, int]:
    """tokens/s from the line after `warmup` steps to the second-to-last (the last one evaluates)."""
    body = lines[:-1] if len(lines) > 2 else lines
    a = body[min(warmup, len(body) - 2)]
    b = body[-1]
    return (b.tokens - a.tokens) / max(b.elapsed - a.elapsed, 1e-9), b.step - a.step


def _node_times(work: Path) -> list[NodeTimes]:
    out = []
    for f in sorted(work.glob("node-*.json")):
        parts = f.stem.split("-")  # node-S or node-S-R
        s = NodeSummary.model_validate_json(f.read_text())
        out.append(
            NodeTimes(
                stage=int(parts[1]),
                replica=int(parts[2]) if len(parts) > 2 else 0,
                compute=s.compute,
                samples_applied=s.samples_applied,
            )
        )
    return out


def measure(spec: RunSpec, console: Console) -> Measured:
    import os

    cfg = run_config(spec)
    shaped = parse_bandwidth(spec.bandwidth) is not None or spec.latency not in ("0", "0ms")
    args = ["--link-bandwidth", spec.bandwidth, "--link-latency", spec.latency] if shaped else []
    with tempfile.TemporaryDirectory(prefix="pmnode-calib-") as d:
        work = Path(d) / "swarm"
        run_local_swarm(
            cfg, stages=spec.stages, replicas=spec.replicas, workdir=work, console=console, node_args=args
        )
        logs = ["node-0", *(f"node-0-{h}" for h in range(1, spec.heads))]
        every = [head_lines(work / "logs" / f"{name}.log") for name in logs]
        nodes = _node_times(work)
    t = cfg.train
    # every head drives its own batches: the swarm's rate is the sum of theirs
    rates = [steady_tokens_per_s(x, warmup_steps(spec, t.batch_size // t.micro)) for x in every]
    rate, n = sum(r for r, _ in rates), min(k for _, k in rates)
    lines = every[0]
    return Measured(
        spec=spec,
        tokens_per_s=round(rate, 1),
        steps_measured=n,
        elapsed=[x.elapsed for x in lines],
        tokens=[x.tokens for x in lines],
        tokens_per_micro_batch=t.micro * t.seq_len,
        micro_batches_per_step=t.batch_size // t.micro,
        fwd_bytes_per_token=lines[-1].fwd_bytes_per_token,
        bwd_bytes_per_token=lines[-1].bwd_bytes_per_token,
        nodes=nodes,
        loadavg_1m=os.getloadavg()[0],
    )
