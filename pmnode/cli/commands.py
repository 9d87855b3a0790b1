"""`pmnode` command line. Commands are thin: parse flags, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pmnode.config import RunConfig, load_config
from pmnode.errors import PmnodeError, run_cli

app = typer.Typer(
    help="pmnode: decentralized model-parallel training with Protocol Models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks; results go to JSON, markdown and PNG.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Run config YAML (see configs/).")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Corpus file/dir, or 'stdlib'; overrides data.source.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]
BandwidthOpt = Annotated[
    str,
    typer.Option(help="Emulate this bandwidth on every outgoing link, e.g. 80mbit, 1gbit; or unlimited."),
]
LatencyOpt = Annotated[str, typer.Option(help="Emulate this one-way latency on every link, e.g. 50ms.")]
CheckpointEveryOpt = Annotated[
    int, typer.Option(help="Also checkpoint every N optimizer steps (0: only on exit).", min=0)
]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PmnodeError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise PmnodeError(f"unknown --device {device!r}: use auto, cpu or cuda")
    return device


def load_with_overrides(
    config: Path, *, steps: int | None = None, data: str | None = None, **sections: dict
) -> RunConfig:
    cfg = load_config(config)
    if steps is not None:
        sections.setdefault("train", {})["steps"] = steps
    if data is not None:
        sections.setdefault("data", {})["source"] = data
    return cfg.with_overrides(**sections) if sections else cfg


@app.command()
def train(
    config: ConfigOpt,
    codec: Annotated[
        str, typer.Option(help="Boundary codec: subspace[:int8][@k], dense[:bf16], int8, topk:N.")
    ] = "",
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    data: DataOpt = None,
    device: DeviceOpt = "cpu",
    summary_json: Annotated[Path | None, typer.Option(help="Write the run summary here.")] = None,
) -> None:
    """Train every stage in one process with the codec at each boundary (the swarm's reference)."""
    from pmnode.cli.progress import train_with_progress
    from pmnode.core.train import config_for

    cfg = load_with_overrides(config, steps=steps, data=data)
    if codec:  # the codec decides the model: constrained for subspace, plain otherwise
        cfg, codec = config_for(cfg, codec)
    else:
        codec = cfg.codec_spec
    summary = train_with_progress(cfg, codec, resolve_device(device), console)
    out = summary.model_dump(include={"steps", "final_train_loss", "heldout_loss", "tokens_per_s", "codec"})
    console.print(
        f"[bold]done[/]: {summary.steps} steps, train loss {summary.final_train_loss:.4f}, "
        f"held-out loss {summary.heldout_loss:.4f}, {summary.tokens_per_s:,.0f} tokens/s"
    )
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary.model_dump(), indent=2))
    else:
        print(json.dumps(out))


@app.command()
def join(
    coordinator: Annotated[
        str | None, typer.Option(help="The multiaddr `coordinator serve` printed.")
    ] = None,
    coordinator_file: Annotated[
        Path | None,
        typer.Option(
            help="Read the coordinator's address from its STATE_DIR/coordinator.json (waits for it)."
        ),
    ] = None,
    stage: Annotated[
        int | None, typer.Option(help="Serve this stage; default: the coordinator picks.")
    ] = None,
    device: DeviceOpt = "auto",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 0,
    announce: Annotated[
        list[str] | None, typer.Option(help="Multiaddr others should dial (behind NAT).")
    ] = None,
    data: DataOpt = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="Save this stage here; --resume loads from it, and so does a node that takes over an "
            "empty stage mid-run."
        ),
    ] = None,
    summary_json: Annotated[Path | None, typer.Option(help="Write this node's summary here on exit.")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast for this node's layers.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue this stage from its checkpoint in --checkpoint-dir.")
    ] = False,
    log_format: Annotated[
        str, typer.Option(help="text: a live panel on a terminal, plain lines otherwise; json: JSON lines.")
    ] = "text",
    link_bandwidth: BandwidthOpt = "unlimited",
    link_latency: LatencyOpt = "0ms",
    checkpoint_every: CheckpointEveryOpt = 0,
    fresh_weights: Annotated[
        bool,
        typer.Option(
            "--fresh-weights",
            help="If this stage has no node and the swarm is past step 0, start it from random weights "
            "instead of refusing to join without a checkpoint.",
        ),
    ] = False,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="Read the run's join token from this file (mode 0600); default: $PMNODE_JOIN_TOKEN, or "
            "the token kept beside --coordinator-file."
        ),
    ] = None,
) -> None:
    """Join a swarm: get a stage from the coordinator, build it, serve and train."""

    from pmnode.net.control import coordinator_from_file
    from pmnode.net.dht import run_until_signal
    from pmnode.net.shaping import parse_bandwidth, parse_latency
    from pmnode.swarm.node import Node
    from pmnode.swarm.options import NodeOptions

    if (coordinator is None) == (coordinator_file is None):
        raise PmnodeError("give exactly one of --coordinator MULTIADDR or --coordinator-file PATH")
    if log_format not in ("text", "json"):
        raise PmnodeError(f"--log-format must be text or json, not {log_format!r}")
    if checkpoint_every and checkpoint_dir is None:
        raise PmnodeError("--checkpoint-every needs --checkpoint-dir DIR")
    if resume and checkpoint_dir is None:
        raise PmnodeError("--resume needs --checkpoint-dir DIR, the directory the checkpoint is in")
    from pmnode.data.dataset import corpus_files
    from pmnode.net.auth import JOIN_TOKEN_ENV, TOKEN_FILE, resolve_token

    device = resolve_device(device)
    if data is not None:
        corpus_files(data)  # a wrong path fails here, not after joining the swarm

    token = resolve_token(
        token_file, fallback=coordinator_file.parent / TOKEN_FILE if coordinator_file is not None else None
    )
    if token is None:
        raise PmnodeError(
            f"this node needs the run's join token: set ${JOIN_TOKEN_ENV} or pass --token-file PATH "
            "(ask the operator; `coordinator serve` showed it once)"
        )
    if coordinator_file is not None:
        coordinator = coordinator_from_file(coordinator_file, local=host.startswith("127."))
    opts = NodeOptions(
        token=token,
        coordinator=coordinator,
        stage=stage,
        device=device,
        host=host,
        port=port,
        announce=announce or [],
        data=data,
        checkpoint_dir=checkpoint_dir,
        bf16=bf16,
        resume=resume,
        log_format=log_format,  # type: ignore[arg-type]
        link_bandwidth=parse_bandwidth(link_bandwidth),
        link_latency=parse_latency(link_latency),
        checkpoint_every=checkpoint_every,
        fresh_weights=fresh_weights,
    )

    node = Node(opts, console)
    node.start()
    summary = run_until_signal(node.run)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(summary.model_dump_json(indent=2, exclude_none=True))


@app.command()
def status(
    coordinator: Annotated[
        str | None, typer.Option(help="The multiaddr `coordinator serve` printed.")
    ] = None,
    coordinator_file: Annotated[
        Path | None, typer.Option(help="Read the address from the coordinator's STATE_DIR/coordinator.json.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.", min=1)] = 15.0,
) -> None:
    """Show the swarm: stages x replicas, throughput, queues, last seen, global step and loss."""
    from pmnode.net.control import coordinator_from_file
    from pmnode.net.status import fetch_status, render

    if (coordinator is None) == (coordinator_file is None):
        raise PmnodeError("give exactly one of --coordinator MULTIADDR or --coordinator-file PATH")
    if coordinator_file is not None:
        coordinator = coordinator_from_file(coordinator_file, local=True, timeout=0)
    st = fetch_status(coordinator, timeout)  # type: ignore[arg-type]
    if as_json:
        print(st.model_dump_json(indent=2))
    else:
        render(st, Console())


@app.command("local-swarm")
def local_swarm(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    stages: Annotated[int, typer.Option(help="Pipeline stages, one process each.", min=2)] = 4,
    replicas: Annotated[int, typer.Option(help="Nodes per stage.", min=1)] = 1,
    steps: Annotated[int | None, typer.Option(help="Override train.steps.", min=1)] = None,
    schedule: Annotated[str | None, typer.Option(help="sync or async; overrides swarm.schedule.")] = None,
    codec: Annotated[str | None, typer.Option(help="Boundary codec; overrides the config.")] = None,
    data: DataOpt = None,
    workdir: Annotated[Path, typer.Option(help="Logs, config, node summaries.")] = Path("runs/local-swarm"),
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Default: WORKDIR/checkpoint.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue every stage from the checkpoint (keeps WORKDIR).")
    ] = False,
    summary_json: Annotated[Path | None, typer.Option(help="Write the swarm summary here.")] = None,
    http_port: Annotated[
        int | None,
        typer.Option(help="Have the coordinator serve its status page on this port; 0 picks one.", min=0),
    ] = None,
    link_bandwidth: BandwidthOpt = "unlimited",
    link_latency: LatencyOpt = "0ms",
    checkpoint_every: CheckpointEveryOpt = 0,
    churn: Annotated[
        str | None,
        typer.Option(
            help="Every MIN-MAX seconds (e.g. 30-60) a replica leaves (SIGKILL and SIGINT in turn) or a new "
            "one joins; needs --replicas 2 or more.",
            metavar="MIN-MAX",
        ),
    ] = None,
) -> None:
    """Run a coordinator and every stage as separate processes on 127.0.0.1 (the embedded default)."""
    import os

    from pmnode.net.shaping import parse_bandwidth, parse_latency
    from pmnode.swarm.local_swarm import run_local_swarm

    parse_bandwidth(link_bandwidth), parse_latency(link_latency)  # fail before starting anything
    gaps = None
    if churn is not None:
        try:
            lo, hi = (float(v) for v in churn.split("-"))
        except ValueError:
            raise PmnodeError(f"--churn takes MIN-MAX seconds, e.g. 30-60, not {churn!r}") from None
        if not 0 < lo <= hi:
            raise PmnodeError(f"--churn {churn}: need 0 < MIN <= MAX seconds")
        gaps = (lo, hi)
        if replicas < 2:
            raise PmnodeError("--churn needs --replicas 2 or more: a leave must never empty a stage")

    sections: dict = {"n_stages": stages, "stage_layers": None}
    if schedule:
        if schedule not in ("sync", "async"):
            raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
        sections["swarm"] = {"schedule": schedule}
    # One process per stage shares this machine's cores: more torch threads only oversubscribe them.
    sections.setdefault("swarm", {})["threads"] = max(1, (os.cpu_count() or 1) // (stages * replicas))
    cfg = load_with_overrides(config, steps=steps, data=data, **sections)
    if codec:
        from pmnode.core.train import config_for

        cfg, _ = config_for(cfg, codec)
    try:
        summary = run_local_swarm(
            cfg,
            stages=stages,
            replicas=replicas,
            workdir=workdir,
            console=console,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            http_port=http_port,
            node_args=[
                "--link-bandwidth",
                link_bandwidth,
                "--link-latency",
                link_latency,
                "--checkpoint-every",
                str(checkpoint_every),
            ],
            churn=gaps,
        )
    except KeyboardInterrupt:  # every process of the swarm is stopped by now
        console.print("interrupted: the swarm's processes are stopped", highlight=False)
        raise typer.Exit(130) from None
    console.print(
        f"[bold]done[/]: {summary.steps} steps, train loss {summary.final_train_loss:.4f}, held-out loss "
        f"{summary.heldout_loss:.4f}, {summary.tokens_per_s:,.0f} tokens/s, "
        f"{summary.wire_bytes_per_token_per_boundary['forward']:.1f} B/token/boundary forward"
    )
    out = summary.model_dump(exclude={"train_losses"})
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary.model_dump(), indent=2))
    print(json.dumps(out))


@app.command()
def generate(
    checkpoint: Annotated[
        Path, typer.Option(help="A swarm checkpoint: the --checkpoint-dir of local-swarm or join.")
    ],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to sample.")] = 200,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens only.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Sample text from a checkpoint: every stage in one process, the codec at each boundary."""
    from pmnode.core.generate import check_sampling, load_checkpoint
    from pmnode.core.generate import generate as generate_text

    if not prompt:
        raise PmnodeError("--prompt is empty: give some text to continue")
    check_sampling(max_new_tokens, temperature, top_k)  # before the (possibly slow) load
    model = load_checkpoint(checkpoint, resolve_device(device))
    lo, hi = min(model.steps), max(model.steps)
    console.print(
        f"loaded run {model.cfg.name} from {checkpoint}: {model.cfg.n_stages} stages, codec {model.codec}, "
        f"step {lo if lo == hi else f'{lo}..{hi} (stages saved at different steps)'}",
        highlight=False,
    )
    out = generate_text(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    print(out.text)  # stdout holds only the text, so it can be piped


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
    codecs: Annotated[str, typer.Option(help="Comma-separated codec specs.")] = "dense,subspace,int8,topk",
    steps: Annotated[int | None, typer.Option(help="Override train.steps.")] = None,
    data: DataOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Train each codec with the same data, seed and steps; compare held-out loss and bytes."""
    from pmnode.bench.core import convergence

    cfg = load_with_overrides(config, steps=steps, data=data)
    specs = [c.strip() for c in codecs.split(",") if c.strip()]
    convergence(cfg, specs, out, resolve_device(device), console, command=" ".join(["pmnode", *sys.argv[1:]]))


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
    import os

    from pmnode.bench.swarm import bench_swarm

    if schedule not in ("sync", "async"):
        raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
    swarm: dict = {"schedule": schedule, "threads": max(1, (os.cpu_count() or 1) // stages)}
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


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
