"""`pmnode bench ...`: the benchmarks; each writes JSON, a markdown table and PNG plots with the exact
command, under docs/benchmarks/ by convention."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pmnode.cli.commands import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    app,
    console,
    load_with_overrides,
    resolve_device,
)
from pmnode.config import load_config
from pmnode.errors import PmnodeError

bench_app = typer.Typer(help="Benchmarks; results go to JSON, markdown and PNG.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("codec")
def bench_codec(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: DeviceOpt = "cpu",
    timing: Annotated[bool, typer.Option(help="Also time encode+decode against a stage's step.")] = True,
    codecs: Annotated[
        str | None,
        typer.Option(help="Comma-separated codec specs, e.g. dense,subspace:int8@64 (@k sets the rank)."),
    ] = None,
) -> None:
    """Bytes per token of every codec and its encode+decode share of a stage's step."""
    from pmnode.bench.core import codec_report, print_codec_table

    specs = [c.strip() for c in codecs.split(",") if c.strip()] if codecs else None
    report = codec_report(load_config(config), resolve_device(device), specs=specs, timing=timing)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_codec_table(report, Console())


@bench_app.command("convergence")
def bench_convergence(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option(help="Output directory for results.json, results.md, loss.png.")],
    codecs: Annotated[
        str,
        typer.Option(
            help="Comma-separated variants: default (the config as shipped, its codec included), "
            "default@d (its twin: k = d, fp32), or a codec spec (dense, subspace@8, subspace@d = "
            "unconstrained); each with optional +key=value config overrides, e.g. "
            "default+model.d_model=128 or subspace@8+subspace.preset=paper."
        ),
    ] = "dense,subspace,int8,topk",
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    tokens: Annotated[
        int | None,
        typer.Option(
            help="Train this many tokens per variant (sets the steps). Long-run mode: each run goes to "
            "OUT/runs/ and the report is rebuilt from every run there, against the unconstrained model.",
            min=1,
        ),
    ] = None,
    target_loss: Annotated[
        float | None,
        typer.Option(help="Held-out loss for steps-to-target; default: the unconstrained run's final loss."),
    ] = None,
    eval_points: Annotated[
        int, typer.Option(help="Held-out evaluations per run (long-run mode).", min=2)
    ] = 20,
    threads: Annotated[int | None, typer.Option(help="torch threads for this process.", min=1)] = None,
    report_only: Annotated[bool, typer.Option(help="Only rebuild the report from OUT/runs/.")] = False,
    replicas: Annotated[
        int,
        typer.Option(
            help="Replicas of every stage, each on 1/R of the batch, joined by the variant's replica_sync "
            "(e.g. +replica_sync.method=outer+replica_sync.compressor=topk); computed in one process. "
            "Long-run mode only.",
            min=1,
        ),
    ] = 1,
    data: DataOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train each variant with the same data, seed and steps; compare held-out loss and bytes."""
    command = " ".join(["pmnode", *sys.argv[1:]])
    cfg = load_with_overrides(config, steps=steps, data=data)
    specs = [c.strip() for c in codecs.split(",") if c.strip()]
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if tokens is None and target_loss is None and not report_only:
        if replicas > 1:
            raise PmnodeError("--replicas needs --tokens (the long-run mode, one JSON per run)")
        from pmnode.bench.core import convergence

        convergence(cfg, specs, out, resolve_device(device), console, command=command)
        return
    from pmnode.bench import scale_report
    from pmnode.bench.fidelity import run_variant, with_tokens
    from pmnode.bench.fidelity_report import write_report
    from pmnode.bench.variants import variant_config

    for spec in specs:
        variant_config(cfg, spec)  # a bad variant fails before hours of training, not after
    if not report_only:
        cfg = with_tokens(cfg, tokens, eval_points)
        for spec in specs:
            r = run_variant(cfg, spec, out, resolve_device(device), console, command, replicas)
            console.print(f"{spec}: held-out {r.heldout_loss:.4f} after {r.tokens:,} tokens")
            if replicas == 1:
                write_report(out, target_loss, cfg.name)
    if scale_report.has_replicas(out):  # replica sync against exact sums, not compression against k = d
        for s in scale_report.write_report(out, cfg.name):
            gap = f"{100 * s.gap:+.2f}%" if s.gap is not None else "-"
            console.print(f"{s.label}: held-out {s.heldout_loss:.4f}, gap {gap}, {s.bytes_per_round:,} B")
        return
    for row in write_report(out, target_loss, cfg.name):
        gap = f"{100 * row.gap_end:+.1f}%" if row.gap_end is not None else "-"
        console.print(
            f"{row.variant}: held-out {row.heldout_loss:.4f}, gap {gap}, steps ratio {row.steps_ratio}"
        )


@bench_app.command("swarm")
def bench_swarm_cmd(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option(help="Output directory for results.json, results.md, throughput.png.")],
    stages: Annotated[int, typer.Option(help="Pipeline stages, one process each.", min=2)] = 4,
    codecs: Annotated[str, typer.Option(help="Comma-separated codec specs.")] = "dense,subspace",
    bandwidths: Annotated[
        str, typer.Option(help="Comma-separated link bandwidths; 'unlimited' is an unshaped link.")
    ] = "unlimited,1gbit,80mbit,20mbit",
    latency: Annotated[str, typer.Option(help="One-way latency added to every shaped link.")] = "50ms",
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    schedule: Annotated[str, typer.Option(help="sync or async.")] = "async",
    max_inflight: Annotated[
        int | None, typer.Option(help="Micro-batches in flight; must cover bandwidth-delay.", min=1)
    ] = None,
    window: Annotated[int, typer.Option(help="Steps per throughput window.", min=1)] = 10,
    data: DataOpt = None,
) -> None:
    """Local-swarm tokens/s per codec and emulated link, at steady state."""

    from pmnode.bench.swarm import bench_swarm

    if schedule not in ("sync", "async"):
        raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
    swarm: dict = {"schedule": schedule}
    if max_inflight is not None:
        swarm["max_inflight"] = max_inflight
    base = load_config(config)
    tail = base.model.n_layers // stages  # the even split's last stage is its smallest
    free = min(base.subspace.uncompressed_tail_layers, max(tail, 0))
    cfg = load_with_overrides(
        config,
        steps=steps,
        data=data,
        n_stages=stages,
        stage_layers=None,
        swarm=swarm,
        subspace={"uncompressed_tail_layers": free},
        train={"eval_every": 10**9},  # evaluate only at the end: evaluations would sit in the windows
    )
    bench_swarm(
        cfg,
        stages=stages,
        codecs=[c.strip() for c in codecs.split(",") if c.strip()],
        bandwidths=[b.strip() for b in bandwidths.split(",") if b.strip()],
        latency=latency,
        out=out,
        window=window,
        console=console,
        command=" ".join(["pmnode", *sys.argv[1:]]),
    )


@bench_app.command("time-to-loss")
def bench_time_to_loss(
    convergence: Annotated[Path, typer.Option(help="A `pmnode bench convergence` output directory.")],
    swarm: Annotated[Path, typer.Option(help="A `pmnode bench swarm` output directory, same config.")],
    out: Annotated[Path, typer.Option(help="Output directory for results.json, results.md and the plot.")],
    codecs: Annotated[str, typer.Option(help="Codecs present in both, first one is the reference.")] = (
        "dense,subspace@16"
    ),
    bandwidth: Annotated[str, typer.Option(help="Which link of the swarm results to use.")] = "80mbit",
    target: Annotated[
        float | None, typer.Option(help="Held-out loss to reach; default: the worst final loss.")
    ] = None,
) -> None:
    """Steps to a target loss (from convergence curves) x steady-state step time on a link."""
    from pmnode.bench.time_to_loss import time_to_loss
    from pmnode.net.shaping import format_bandwidth, parse_bandwidth

    result = time_to_loss(
        convergence,
        swarm,
        codecs=[c.strip() for c in codecs.split(",") if c.strip()],
        bandwidth=format_bandwidth(parse_bandwidth(bandwidth)),
        target=target,
        out=out,
        command=" ".join(["pmnode", *sys.argv[1:]]),
    )
    for r in result["runs"]:
        secs = r["seconds_to_target"]
        console.print(
            f"{r['codec']}: {'not reached' if secs is None else f'{secs:,.0f} s'} to held-out "
            f"{r['target_loss']:.4f} at {r['bandwidth']}",
            highlight=False,
        )
