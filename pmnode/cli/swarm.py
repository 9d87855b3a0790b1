"""`pmnode join` and `pmnode local-swarm`: the commands that run a swarm node, or a whole swarm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pmnode.cli.commands import (
    BandwidthOpt,
    CheckpointEveryOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    LatencyOpt,
    app,
    console,
    load_with_overrides,
    resolve_device,
)
from pmnode.config import MachineConfig
from pmnode.config.replica_sync import check_for_swarm
from pmnode.errors import PmnodeError


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
    threads: Annotated[
        int | None, typer.Option(help="torch threads for this node (default: torch's choice).", min=1)
    ] = None,
    optimizer_state: Annotated[
        str, typer.Option(help="AdamW's moments: fp32 (8 B/parameter) or int8 (2 B, 8-bit blocks).")
    ] = "fp32",
    checkpoint_layers: Annotated[
        bool, typer.Option("--checkpoint-layers", help="Recompute each layer in the backward: less memory.")
    ] = False,
    fused_adam: Annotated[
        bool | None,
        typer.Option("--fused-adam/--no-fused-adam", help="torch's fused AdamW; default: on for CUDA."),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(help="Memory this node may use, e.g. 24GB; default: the GPU's, or the free RAM."),
    ] = None,
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
    relay: Annotated[
        bool,
        typer.Option(
            "--relay",
            help="Relay traffic for members behind NAT (when this node is reachable and the operator named "
            "it: coordinator serve --relay-peer ID).",
        ),
    ] = False,
) -> None:
    """Join a swarm: get a stage from the coordinator, build it, serve and train."""

    from pmnode.core.sizing import parse_size
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
    from pmnode.net.tokens import JOIN_TOKEN_ENV, TOKEN_FILE, resolve_token

    device = resolve_device(device)
    if optimizer_state not in ("fp32", "int8"):
        raise PmnodeError(f"--optimizer-state must be fp32 or int8, not {optimizer_state!r}")
    if data is not None and data != "stdlib" and not Path(data).exists():  # here, not after joining
        raise PmnodeError(
            f"data path not found: {data} (give a prepared directory, a corpus path or 'stdlib')"
        )

    if coordinator_file is not None:  # first: a node started beside its coordinator waits for it (compose),
        # and the coordinator writes the join token beside the file before the file itself
        coordinator = coordinator_from_file(coordinator_file, local=host.startswith("127."))
    token = resolve_token(
        token_file, fallback=coordinator_file.parent / TOKEN_FILE if coordinator_file is not None else None
    )
    if token is None:
        raise PmnodeError(
            f"this node needs the run's join token: set ${JOIN_TOKEN_ENV} or pass --token-file PATH "
            "(ask the operator; `coordinator serve` showed it once)"
        )
    opts = NodeOptions(
        token=token,
        coordinator=coordinator,
        stage=stage,
        machine=MachineConfig(
            device=device,
            threads=threads,
            autocast_bf16=bf16,
            data=data,
            optimizer_state=optimizer_state,
            checkpoint_layers=checkpoint_layers,
            fused_adam=fused_adam,
            memory_limit=parse_size(memory_limit) if memory_limit else None,
        ),
        host=host,
        port=port,
        announce=announce or [],
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        log_format=log_format,
        link_bandwidth=parse_bandwidth(link_bandwidth),
        link_latency=parse_latency(link_latency),
        checkpoint_every=checkpoint_every,
        fresh_weights=fresh_weights,
        relay=relay,
    )

    node = Node(opts, console)
    node.start()
    summary = run_until_signal(node.run)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(summary.model_dump_json(indent=2, exclude_none=True))


@app.command("local-swarm")
def local_swarm(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    stages: Annotated[int, typer.Option(help="Pipeline stages, one process each.", min=2)] = 4,
    replicas: Annotated[int, typer.Option(help="Nodes per stage after the heads.", min=1)] = 1,
    heads: Annotated[
        int | None,
        typer.Option(
            help="Stage-0 nodes driving the pipeline at once, each with its own part of the data "
            "(overrides swarm.heads; train.batch_size is per head).",
            min=1,
            max=64,
        ),
    ] = None,
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
    http_token_file: Annotated[
        Path | None,
        typer.Option(help="The status page's bearer token, in this file (mode 0600); see coordinator serve."),
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

    from pmnode.net.shaping import parse_bandwidth, parse_latency
    from pmnode.swarm.local_swarm import run_local_swarm

    parse_bandwidth(link_bandwidth), parse_latency(link_latency)  # fail before starting anything
    gaps = _churn_gaps(churn, replicas)

    sections: dict = {"n_stages": stages, "stage_layers": None}
    if schedule:
        if schedule not in ("sync", "async"):
            raise PmnodeError(f"--schedule must be sync or async, not {schedule!r}")
        sections["swarm"] = {"schedule": schedule}
    if heads is not None:
        sections.setdefault("swarm", {})["heads"] = heads
    cfg = load_with_overrides(config, steps=steps, data=data, **sections)
    if codec:
        from pmnode.core.train import config_for

        cfg, _ = config_for(cfg, codec)
    check_for_swarm(cfg.replica_sync, cfg.swarm.schedule)
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
            http_token_file=http_token_file,
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


def _churn_gaps(churn: str | None, replicas: int) -> tuple[float, float] | None:
    """--churn MIN-MAX as seconds, or one line saying what is wrong with it."""
    if churn is None:
        return None
    try:
        lo, hi = (float(v) for v in churn.split("-"))
    except ValueError:
        raise PmnodeError(f"--churn takes MIN-MAX seconds, e.g. 30-60, not {churn!r}") from None
    if not 0 < lo <= hi:
        raise PmnodeError(f"--churn {churn}: need 0 < MIN <= MAX seconds")
    if replicas < 2:
        raise PmnodeError("--churn needs --replicas 2 or more: a leave must never empty a stage")
    return lo, hi
