"""Measure the local swarms the simulator is calibrated on (docs/benchmarks/plan/).

    python -m benchmarks.plan_calibrate --out docs/benchmarks/plan/measured.json [--only NAME,...]

Each run is appended to OUT as soon as it ends, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from benchmarks.calibrate import Measured, RunSpec, measure
from pmnode.errors import run_cli

T, S = "tiny", "small"
RUNS = [
    RunSpec(name="tiny-4-sync", config=T, stages=4, schedule="sync"),
    RunSpec(name="tiny-4-async-if4", config=T, stages=4, inflight=4),
    RunSpec(name="tiny-4-async-if32", config=T, stages=4, inflight=32),
    RunSpec(name="tiny-2-dense-5mbit", config=T, stages=2, codec="dense", bandwidth="5mbit", inflight=32),
    RunSpec(
        name="tiny-3-dense-20mbit-50ms",
        config=T,
        stages=3,
        codec="dense",
        bandwidth="20mbit",
        latency="50ms",
        inflight=32,
    ),
    RunSpec(
        name="tiny-4-sync-dense-80mbit-50ms",
        config=T,
        stages=4,
        schedule="sync",
        codec="dense",
        bandwidth="80mbit",
        latency="50ms",
        steps=30,
        warmup=5,
    ),
    RunSpec(name="tiny-4-async-80mbit-50ms-if4", config=T, stages=4, bandwidth="80mbit", latency="50ms"),
    RunSpec(name="tiny-3-async-2rep-if32", config=T, stages=3, inflight=32, replicas=2),
    # replicas summing their gradients in every commit: what the RPC stack costs per byte
    RunSpec(name="tiny-3-sync-2rep", config=T, stages=3, schedule="sync", replicas=2, steps=60),
    RunSpec(name="small-2-sync", config=S, stages=2, schedule="sync", steps=40),
    RunSpec(name="small-4-async-if32", config=S, stages=4, inflight=32, steps=80),
    # small has one micro-batch per step: a window of 8 leaves most of the run to measure
    RunSpec(
        name="small-2-dense-5mbit-50ms",
        config=S,
        stages=2,
        codec="dense",
        bandwidth="5mbit",
        latency="50ms",
        inflight=8,
        steps=36,
    ),
    RunSpec(
        name="small-3-dense-20mbit",
        config=S,
        stages=3,
        codec="dense",
        bandwidth="20mbit",
        inflight=8,
        steps=40,
    ),
    RunSpec(
        name="small-4-sync-dense-80mbit-50ms",
        config=S,
        stages=4,
        schedule="sync",
        codec="dense",
        bandwidth="80mbit",
        latency="50ms",
        steps=30,
    ),
]


def main(
    out: Annotated[Path, typer.Option(help="JSON list of measured runs; appended to.")],
    only: Annotated[str, typer.Option(help="Comma-separated run names; default all.")] = "",
) -> None:
    console = Console(stderr=True)
    names = [n for n in only.split(",") if n]
    done = [Measured.model_validate(r) for r in json.loads(out.read_text())] if out.exists() else []
    for spec in RUNS:
        if names and spec.name not in names:
            continue
        console.print(f"[bold]{spec.name}[/]")
        m = measure(spec, console)
        console.print(f"  {m.tokens_per_s:,.0f} tokens/s over {m.steps_measured} steps")
        done = [d for d in done if d.spec.name != spec.name] + [m]
        out.write_text(json.dumps([d.model_dump() for d in done], indent=1))


if __name__ == "__main__":
    run_cli(lambda: typer.run(main))
