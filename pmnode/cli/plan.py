"""`pmnode plan`: what a swarm of this config will do on these GPUs and links, before anyone joins."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pmnode.cli.common import ConfigOpt, app, load_with_overrides
from pmnode.errors import PmnodeError


@app.command()
def plan(
    config: ConfigOpt,
    gpu: Annotated[
        str | None, typer.Option(help="A GPU of the shipped table (rtx4090, a100, h100, l4...); or --tflops.")
    ] = None,
    tflops: Annotated[float | None, typer.Option(help="bf16 dense peak TFLOP/s of every node.")] = None,
    mfu: Annotated[float, typer.Option(help="Fraction of the peak the layers reach.")] = 0.4,
    bandwidth: Annotated[
        str, typer.Option(help="Every node's uplink, e.g. 80mbit, 1gbit; or unlimited.")
    ] = "80mbit",
    latency: Annotated[str, typer.Option(help="One-way latency of every link, e.g. 50ms.")] = "50ms",
    stages: Annotated[int | None, typer.Option(help="Pipeline stages; default the config's.")] = None,
    replicas: Annotated[int, typer.Option(help="Nodes per stage after the head.")] = 1,
    heads: Annotated[
        int | None,
        typer.Option(help="Stage-0 nodes, each driving train.batch_size a step; default the config's."),
    ] = None,
    replica_sync: Annotated[
        str | None,
        typer.Option(help="How replicas stay one model: outer, step or grads (sync); default the config's."),
    ] = None,
    inner_steps: Annotated[
        int | None, typer.Option(help="outer: steps between two rounds (H); default the config's.")
    ] = None,
    compressor: Annotated[
        str | None, typer.Option(help="outer, grads: none, topk or powersgd; default the config's.")
    ] = None,
    sync_topology: Annotated[
        str,
        typer.Option(help="all-gather: a replica sends its share to every other; relay: once, to a relay."),
    ] = "all-gather",
    codec: Annotated[
        str | None, typer.Option(help="Boundary codec, e.g. dense:bf16, subspace@40, subspace:int8@40.")
    ] = None,
    schedule: Annotated[str | None, typer.Option(help="sync or async; default the config's.")] = None,
    max_inflight: Annotated[
        int | None, typer.Option(help="Micro-batches in flight; default the config's.")
    ] = None,
    measured: Annotated[
        Path | None,
        typer.Option(help="Take per-stage times from node summaries (a local swarm's workdir, or one file)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Per stage: FLOPs and bytes per token, compute and link rates, replica-sync traffic, what binds; the
    swarm's tokens/s, and the replica sync that fits the link."""
    from rich.console import Console

    from pmnode.net.shaping import parse_bandwidth, parse_latency
    from pmnode.plan.costs import codec_bytes
    from pmnode.plan.gpus import gpu_named
    from pmnode.plan.plan import device_times, make_plan, measured_times, stage_costs
    from pmnode.plan.report import print_plan

    sources = sum(x is not None for x in (gpu, tflops, measured))
    if sources != 1:
        raise PmnodeError("give exactly one of --gpu NAME, --tflops X or --measured FILE")
    if not 0 < mfu <= 1:
        raise PmnodeError(f"--mfu must be in (0, 1], not {mfu}")
    if replicas < 1 or (stages is not None and stages < 2):
        raise PmnodeError("--replicas must be 1 or more and --stages 2 or more")
    if schedule not in (None, "sync", "async"):
        raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
    if tflops is not None and tflops <= 0:
        raise PmnodeError(f"--tflops must be positive, not {tflops}")
    if max_inflight is not None and max_inflight < 1:
        raise PmnodeError("--max-inflight must be 1 or more")
    if heads is not None and heads < 1:
        raise PmnodeError("--heads must be 1 or more")
    if replica_sync not in (None, "outer", "step", "grads"):
        raise PmnodeError(f"--replica-sync must be outer, step or grads, not {replica_sync!r}")
    if inner_steps is not None and inner_steps < 1:
        raise PmnodeError("--inner-steps must be 1 or more")
    if compressor not in (None, "none", "topk", "powersgd"):
        raise PmnodeError(f"--compressor must be none, topk or powersgd, not {compressor!r}")
    if sync_topology not in ("all-gather", "relay"):
        raise PmnodeError(f"--sync-topology must be all-gather or relay, not {sync_topology!r}")
    bw, lat = parse_bandwidth(bandwidth), parse_latency(latency)
    sections: dict = {}
    if stages is not None:
        sections.update(n_stages=stages, stage_layers=None)
    swarm = {k: v for k, v in (("schedule", schedule), ("max_inflight", max_inflight)) if v is not None}
    if swarm:
        sections["swarm"] = swarm
    rs = (("method", replica_sync), ("inner_steps", inner_steps), ("compressor", compressor))
    if any(v is not None for _, v in rs):
        sections["replica_sync"] = {k: v for k, v in rs if v is not None}
    cfg = load_with_overrides(config, **sections)
    spec = codec or cfg.codec_spec
    codec_bytes(cfg, spec)  # a bad codec fails here, in one line
    memory = gpu_named(gpu).memory_gb if gpu is not None else None
    if measured is not None:
        times, device = measured_times(measured, cfg), f"measured ({measured})"
    else:
        peak = gpu_named(gpu).bf16_tflops if gpu is not None else tflops
        assert peak is not None
        times = device_times(stage_costs(cfg, spec), peak * 1e12 * mfu)
        device = f"{gpu or f'{peak:g} TFLOP/s'} at {mfu:.0%} MFU"
    result = make_plan(
        cfg,
        spec,
        fwd_bwd=times,
        device=device,
        bandwidth=bw,
        latency=lat,
        replicas=replicas,
        heads=heads if heads is not None else cfg.swarm.heads,
        topology=sync_topology,  # type: ignore[arg-type]  # typer gives a str, checked above
        max_inflight=cfg.swarm.inflight_limit,
        gpu_memory_gb=memory,
    )
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        print_plan(result, Console(width=max(Console().width, 150)))
