"""`pmnode join` and `pmnode local-swarm`: the commands that run a swarm node, or a whole swarm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from pmnode.cli.common import (
    ConfigOpt,
    DataOpt,
    app,
    console,
    load_with_overrides,
    resolve_device,
)
from pmnode.cli.fields import Flag, FlagValues, with_flags
from pmnode.config import MachineConfig
from pmnode.config.replica_sync import check_for_swarm
from pmnode.config.sections import SwarmConfig, TrainConfig
from pmnode.errors import PmnodeError
from pmnode.swarm.options import NodeOptions


def _size(text: str) -> int:
    from pmnode.core.sizing import parse_size

    return parse_size(text)


def _bandwidth(text: str) -> float | None:
    from pmnode.net.shaping import parse_bandwidth

    return parse_bandwidth(text)


def _latency(text: str) -> float:
    from pmnode.net.shaping import parse_latency

    return parse_latency(text)


# A node's link and checkpoint flags: join's, and local-swarm's, which passes them to every node.
LINK_FLAGS = (
    Flag(NodeOptions, "link_bandwidth", text=_bandwidth, default="unlimited"),
    Flag(NodeOptions, "link_latency", text=_latency, default="0ms"),
    Flag(NodeOptions, "checkpoint_every"),
)
# join's flags, made from the fields they set (pmnode.cli.fields): one source for name, type, default, help.
JOIN_FLAGS = (
    Flag(NodeOptions, "stage"),
    Flag(MachineConfig, "device", default="auto"),
    Flag(NodeOptions, "host"),
    Flag(NodeOptions, "port"),
    Flag(NodeOptions, "announce", metavar="MULTIADDR"),
    Flag(MachineConfig, "data"),
    Flag(NodeOptions, "checkpoint_dir"),
    Flag(MachineConfig, "autocast_bf16", name="bf16"),
    Flag(MachineConfig, "threads"),
    Flag(MachineConfig, "optimizer_state"),
    Flag(MachineConfig, "checkpoint_layers"),
    Flag(MachineConfig, "fused_adam"),
    Flag(MachineConfig, "memory_limit", text=_size),
    Flag(NodeOptions, "resume"),
    Flag(NodeOptions, "log_format"),
    *LINK_FLAGS,
    Flag(NodeOptions, "fresh_weights"),
    Flag(NodeOptions, "relay"),
)


@app.command()
@with_flags(*JOIN_FLAGS)
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
    summary_json: Annotated[Path | None, typer.Option(help="Write this node's summary here on exit.")] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="Read the run's join token from this file (mode 0600); default: $PMNODE_JOIN_TOKEN, or "
            "the token kept beside --coordinator-file."
        ),
    ] = None,
    **flags: Any,
) -> None:
    """Join a swarm: get a stage from the coordinator, build it, serve and train."""

    from pmnode.net.control import coordinator_from_file
    from pmnode.net.dht import run_until_signal
    from pmnode.net.tokens import JOIN_TOKEN_ENV, TOKEN_FILE, resolve_token
    from pmnode.swarm.node import Node

    given = FlagValues(JOIN_FLAGS, flags)
    if (coordinator is None) == (coordinator_file is None):
        raise PmnodeError("give exactly one of --coordinator MULTIADDR or --coordinator-file PATH")
    machine = given.build(MachineConfig, device=resolve_device(flags["device"] or "auto"))
    # every flag checked (one line naming it) before anything is read or dialled
    opts = given.build(NodeOptions, coordinator=coordinator or "", machine=machine)
    if opts.checkpoint_every and opts.checkpoint_dir is None:
        raise PmnodeError("--checkpoint-every needs --checkpoint-dir DIR")
    if opts.resume and opts.checkpoint_dir is None:
        raise PmnodeError("--resume needs --checkpoint-dir DIR, the directory the checkpoint is in")
    data = machine.data
    if data is not None and data != "stdlib" and not Path(data).exists():  # here, not after joining
        raise PmnodeError(
            f"data path not found: {data} (give a prepared directory, a corpus path or 'stdlib')"
        )

    if coordinator_file is not None:  # first: a node started beside its coordinator waits for it (compose),
        # and the coordinator writes the join token beside the file before the file itself
        coordinator = coordinator_from_file(coordinator_file, local=opts.host.startswith("127."))
    token = resolve_token(
        token_file, fallback=coordinator_file.parent / TOKEN_FILE if coordinator_file is not None else None
    )
    if token is None:
        raise PmnodeError(
            f"this node needs the run's join token: set ${JOIN_TOKEN_ENV} or pass --token-file PATH "
            "(ask the operator; `coordinator serve` showed it once)"
        )
    opts = opts.model_copy(update={"token": SecretStr(token), "coordinator": coordinator})  # checked above

    node = Node(opts, console)
    node.start()
    summary = run_until_signal(node.run)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(summary.model_dump_json(indent=2, exclude_none=True))


# local-swarm's flags that set the run config or every node (pmnode.cli.fields).
SWARM_FLAGS = (
    Flag(SwarmConfig, "heads", section="swarm"),
    Flag(TrainConfig, "steps", section="train"),
    Flag(SwarmConfig, "schedule", section="swarm"),
    *LINK_FLAGS,
)


@app.command("local-swarm")
@with_flags(*SWARM_FLAGS)
def local_swarm(
    config: ConfigOpt = Path("configs/tiny.yaml"),
    stages: Annotated[int, typer.Option(help="Pipeline stages, one process each.", min=2)] = 4,
    replicas: Annotated[int, typer.Option(help="Nodes per stage after the heads.", min=1)] = 1,
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
    churn: Annotated[
        str | None,
        typer.Option(
            help="Every MIN-MAX seconds (e.g. 30-60) a replica leaves (SIGKILL and SIGINT in turn) or a new "
            "one joins; needs --replicas 2 or more.",
            metavar="MIN-MAX",
        ),
    ] = None,
    **flags: Any,
) -> None:
    """Run a coordinator and every stage as separate processes on 127.0.0.1 (the embedded default)."""

    from pmnode.swarm.local_swarm import run_local_swarm

    given = FlagValues(SWARM_FLAGS, flags)
    given.of(NodeOptions)  # the nodes' flags checked before starting anything
    gaps = _churn_gaps(churn, replicas)
    sections: dict = {"n_stages": stages, "stage_layers": None}
    if swarm := given.of(SwarmConfig):
        sections["swarm"] = swarm
    if train := given.of(TrainConfig):
        sections["train"] = train
    cfg = load_with_overrides(config, data=data, **sections)
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
                a for f in LINK_FLAGS if flags[f.param] is not None for a in (f.option, str(flags[f.param]))
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
