"""`pmnode bench ...`: the benchmarks; each writes JSON, a markdown table and PNG plots with the exact
command, under docs/benchmarks/ by convention."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pmnode.bench.plotting import pyplot
from pmnode.cli.common import (
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    app,
    console,
    load_with_overrides,
    resolve_device,
)
from pmnode.data.resolve import load_run_config
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
    report = codec_report(load_run_config(config), resolve_device(device), specs=specs, timing=timing)
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
    pyplot()  # a missing `bench` extra fails now, not after the runs
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
    pyplot()  # a missing `bench` extra fails now, not after the runs
    from pmnode.bench.swarm import bench_swarm

    if schedule not in ("sync", "async"):
        raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
    swarm: dict = {"schedule": schedule}
    if max_inflight is not None:
        swarm["max_inflight"] = max_inflight
    base = load_run_config(config)
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
    out: Annotated[Path, typer.Option(help="Output directory for results.json, results.md and the plot.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Train this config over --link and unlimited (the run mode)."),
    ] = None,
    link: Annotated[str, typer.Option(help="Run mode: BANDWIDTH+LATENCY, e.g. 80mbit+50ms.")] = (
        "80mbit+50ms"
    ),
    variants: Annotated[
        str, typer.Option(help="Run mode: sync, none, nesterov, predict; NAME@N keeps N in flight.")
    ] = "sync,nesterov",
    stages: Annotated[int, typer.Option(help="Run mode: pipeline stages, one process each.", min=2)] = 4,
    steps: Annotated[int | None, typer.Option(help="Run mode: override train.steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Run mode: override train.batch_size.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Run mode: override micro_batch_size.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Run mode: override train.eval_every.")] = None,
    data: DataOpt = None,
    convergence: Annotated[
        Path | None, typer.Option(help="Join mode: a `pmnode bench convergence` output directory.")
    ] = None,
    swarm: Annotated[
        Path | None, typer.Option(help="Join mode: a `pmnode bench swarm` output directory, same config.")
    ] = None,
    codecs: Annotated[str, typer.Option(help="Join mode: codecs in both, the first is the reference.")] = (
        "dense,subspace@16"
    ),
    bandwidth: Annotated[str, typer.Option(help="Join mode: which link of the swarm results.")] = "80mbit",
    target: Annotated[
        float | None,
        typer.Option(help="Held-out loss to reach; default: sync's final unlimited (run), the worst (join)."),
    ] = None,
) -> None:
    """Wall time to a target held-out loss over a link. Run mode (--config): sync and async variants
    train over --link and over an unlimited link. Join mode (--convergence, --swarm): convergence
    curves x steady-state tokens/s."""
    pyplot()  # a missing `bench` extra fails now, not after the runs
    command = " ".join(["pmnode", *sys.argv[1:]])
    if config is not None:
        _time_to_loss_runs(config, out, link, variants, stages, steps, batch_size, micro_batch_size,
                           eval_every, data, target, command)  # fmt: skip
        return
    if convergence is None or swarm is None:
        raise PmnodeError("time-to-loss: give --config (train over the link) or --convergence and --swarm")
    from pmnode.bench.time_to_loss import time_to_loss
    from pmnode.net.shaping import format_bandwidth, parse_bandwidth

    result = time_to_loss(
        convergence,
        swarm,
        codecs=[c.strip() for c in codecs.split(",") if c.strip()],
        bandwidth=format_bandwidth(parse_bandwidth(bandwidth)),
        target=target,
        out=out,
        command=command,
    )
    for r in result["runs"]:
        secs = r["seconds_to_target"]
        console.print(
            f"{r['codec']}: {'not reached' if secs is None else f'{secs:,.0f} s'} to held-out "
            f"{r['target_loss']:.4f} at {r['bandwidth']}",
            highlight=False,
        )


def _time_to_loss_runs(
    config: Path,
    out: Path,
    link: str,
    variants: str,
    stages: int,
    steps: int | None,
    batch_size: int | None,
    micro_batch_size: int | None,
    eval_every: int | None,
    data: str | None,
    target: float | None,
    command: str,
) -> None:
    """The run mode: resumes from OUT/results.json (runs already there are kept)."""
    from pmnode.bench import link_ttl

    train = {k: v for k, v in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
                                ("eval_every", eval_every)) if v is not None}  # fmt: skip
    base = load_run_config(config)
    tail = min(base.subspace.uncompressed_tail_layers, base.model.n_layers // stages)
    cfg = load_with_overrides(
        config,
        steps=steps,
        data=data,
        n_stages=stages,
        stage_layers=None,
        train=train,
        subspace={"uncompressed_tail_layers": tail},
    )
    names = [v.strip() for v in variants.split(",") if v.strip()]
    result = link_ttl.bench(cfg, out=out, link=link, variants=names, stages=stages, target=target,
                            command=command, title=f"{config}", console=console)  # fmt: skip
    for r in result.get("rows", []):
        secs = r["seconds_to_target"]
        console.print(
            f"{r['variant']} over {r['link']}: held-out {r['heldout_loss']:.4f}, {r['tokens_per_s']:,.0f} "
            f"tokens/s, {'not reached' if secs is None else f'{secs:,.0f} s'} to {result['target']:.4f}",
            highlight=False,
        )
