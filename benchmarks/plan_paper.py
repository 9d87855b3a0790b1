"""Paper-scale predictions from the simulator (docs/benchmarks/plan/paper-scale.*).

    python -m benchmarks.plan_paper --out docs/benchmarks/plan

The Llama-8B shape in 8 stages of 4 layers on RTX 4090s at 40% MFU: dense bf16 against subspace
k = 40 (fp32 and int8 coefficients) over 100 Gbit/s, 1 Gbit/s, 80 and 20 Mbit/s with 50 ms; then
8 stages x 16 replicas with log-normal uplinks around 80 Mbit/s and churn.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Annotated

import typer

from pmnode.config import load_config
from pmnode.errors import run_cli
from pmnode.net.shaping import format_bandwidth, parse_bandwidth
from pmnode.plan.gpus import gpu_named
from pmnode.plan.plan import device_times, make_plan, stage_costs
from pmnode.sim.model import NodeSpec, StageSpec, SwarmSpec
from pmnode.sim.swarm import SwarmSim

CODECS = ["dense:bf16", "subspace@40", "subspace:int8@40"]
LINKS = ["100gbit", "1gbit", "80mbit", "20mbit"]
MFU, GPU, LATENCY = 0.4, "rtx4090", 0.05


def homogeneous(cfg_path: Path) -> list[dict]:
    cfg = load_config(cfg_path)
    flops = gpu_named(GPU).bf16_tflops * 1e12 * MFU
    rows = []
    for codec in CODECS:
        times = device_times(stage_costs(cfg, codec), flops)
        for link in LINKS:
            bw = parse_bandwidth(link)
            p = make_plan(cfg, codec, fwd_bwd=times, device=GPU, bandwidth=bw, latency=LATENCY,
                          replicas=1, max_inflight=cfg.swarm.inflight_limit)  # fmt: skip
            rows.append(
                {
                    "codec": codec,
                    "bandwidth": link,
                    "bytes_fwd_per_token": p.costs[0].bytes_fwd_per_token,
                    "closed_tokens_per_s": round(p.closed.tokens_per_s, 1),
                    "sim_tokens_per_s": p.simulated.tokens_per_s,
                    "utilisation": [s.utilisation for s in p.simulated.stages],
                    "binding": p.simulated.binding,
                    "step_s": p.simulated.step_s,
                }
            )
    return rows


LIGHT_HEAD = [1, 5, 5, 5, 5, 5, 5, 1]  # the unreplicated head (and the LM-head tail) hold one layer


def swarm_spec(
    cfg_path: Path, codec: str, rng: random.Random, churn: bool, layers: list[int] | None
) -> SwarmSpec:
    """8 stages x 16 replicas (the head: one node), uplinks log-normal around 80 Mbit/s (sigma 0.6),
    50 ms; with churn, a quarter of the replicas leave at random times and as many new ones join."""
    over = {"subspace": {"uncompressed_tail_layers": 1}} if layers else {}
    cfg = load_config(cfg_path).with_overrides(stage_layers=layers, **over)
    fwd, bwd = device_times(stage_costs(cfg, codec), gpu_named(GPU).bf16_tflops * 1e12 * MFU)
    costs = stage_costs(cfg, codec)
    t = cfg.train
    m = t.micro * t.seq_len
    horizon = 1800.0  # seconds over which leaves and joins are spread

    def node(i: int) -> NodeSpec:
        base = parse_bandwidth("80mbit")
        assert base is not None  # a rate, not "unlimited"
        bw = base * math.exp(rng.gauss(0, 0.6))
        if not churn or i == 0:
            return NodeSpec(bandwidth=bw, latency=LATENCY)
        r = rng.random()
        if r < 0.25:
            return NodeSpec(bandwidth=bw, latency=LATENCY, leave_at=rng.uniform(60, horizon))
        if r < 0.5:
            return NodeSpec(bandwidth=bw, latency=LATENCY, join_at=rng.uniform(60, horizon))
        return NodeSpec(bandwidth=bw, latency=LATENCY)

    last = len(costs) - 1
    stages = []
    for s in range(len(costs)):
        n = 1 if s == 0 else 16 + (4 if churn else 0)  # churn: extra nodes that join later
        stages.append(
            StageSpec(
                fwd_s=0.0 if s == last else m * fwd[s],
                bwd_s=m * (bwd[s] + (fwd[s] if s == last else 0.0)),
                nodes=[node(i if s else 0) for i in range(n)],
            )
        )
    return SwarmSpec(
        stages=stages,
        schedule="async",
        max_inflight=128,
        micro_batches_per_step=t.batch_size // t.micro,
        tokens_per_micro_batch=m,
        fwd_bytes_per_token=costs[0].bytes_fwd_per_token,
        bwd_bytes_per_token=costs[-1].bytes_bwd_per_token,
        retry_s=10.0,
        seed=rng.randrange(2**31),
    )


def heterogeneous(cfg_path: Path) -> list[dict]:
    rows = []
    for codec, layers in [
        *((c, None) for c in CODECS),
        ("subspace@40", LIGHT_HEAD),
        ("dense:bf16", LIGHT_HEAD),
    ]:
        for churn in (False, True):
            spec = swarm_spec(cfg_path, codec, random.Random(7), churn, layers)
            r = SwarmSim(spec).run(40)
            rows.append(
                {
                    "codec": codec,
                    "churn": churn,
                    "stage_layers": layers or [4] * 8,
                    "sim_tokens_per_s": r.tokens_per_s,
                    "utilisation": [s.utilisation for s in r.stages],
                    "binding": r.binding,
                    "retried": r.retried,
                    "seconds": r.seconds,
                }
            )
    return rows


def write(out: Path, homo: list[dict], het: list[dict], command: str) -> None:
    (out / "paper-scale.json").write_text(
        json.dumps({"command": command, "homogeneous": homo, "swarm_8x16": het}, indent=1)
    )
    base = {r["codec"]: r["sim_tokens_per_s"] for r in homo if r["bandwidth"] == "100gbit"}
    lines = [
        f"Command: `{command}`",
        "",
        "Llama-8B shape (d = 4096, 32 layers, vocab 128k), 8 stages of 4 layers, one RTX 4090 per stage "
        "at 40% of its 165 TFLOP/s bf16 peak, micro-batches of 4 x 2048 tokens, 16 in flight, async, "
        "50 ms one way.",
        "",
        "| codec | B/token | link | tokens/s (sim) | closed form | vs own 100 Gbit/s "
        "| mean stage utilisation | binds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in homo:
        util = sum(r["utilisation"]) / len(r["utilisation"])
        lines.append(
            f"| {r['codec']} | {r['bytes_fwd_per_token']} "
            f"| {format_bandwidth(parse_bandwidth(r['bandwidth']))} "
            f"| {r['sim_tokens_per_s']:,.0f} | {r['closed_tokens_per_s']:,.0f} "
            f"| {r['sim_tokens_per_s'] / base[r['codec']]:.3f} | {util:.2f} | {r['binding']} |"
        )
    lines += [
        "",
        "8 stages x 16 replicas (the head is one node: it is never replicated), uplinks log-normal around "
        "80 Mbit/s (sigma 0.6 in log space), 50 ms, 128 micro-batches in flight; with churn, a quarter "
        "of the replicas leave at random times in the first 30 minutes and about as many new ones join.",
        "",
        "| codec | layers per stage | churn | tokens/s (sim) | utilisation head, stages 1-7 (mean) | binds "
        "| micro-batches re-sent |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in het:
        u = r["utilisation"]
        lines.append(
            f"| {r['codec']} | {'-'.join(map(str, r['stage_layers']))} | {'yes' if r['churn'] else 'no'} "
            f"| {r['sim_tokens_per_s']:,.0f} "
            f"| {u[0]:.2f}, {sum(u[1:]) / len(u[1:]):.2f} | {r['binding']} | {r['retried']} |"
        )
    (out / "paper-scale.md").write_text("\n".join(lines) + "\n")


def main(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("docs/benchmarks/plan"),
    config: Annotated[Path, typer.Option(help="The model shape.")] = Path(
        "docs/benchmarks/plan/llama8b.yaml"
    ),
) -> None:
    homo = homogeneous(config)
    het = heterogeneous(config)
    write(out, homo, het, f"python -m benchmarks.plan_paper --out {out}")
    print((out / "paper-scale.md").read_text())


if __name__ == "__main__":
    run_cli(lambda: typer.run(main))
