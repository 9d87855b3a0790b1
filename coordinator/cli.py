"""`coordinator` command line: the operator's side of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from pmnode.config.replica_sync import check_for_swarm
from pmnode.core.stages import build_subspace, free_layers, split_layers
from pmnode.data.resolve import load_run_config
from pmnode.errors import run_cli

if TYPE_CHECKING:
    from pmnode.plan.advice import RankAdvice

app = typer.Typer(
    help="pmnode coordinator: holds the run config and subspace seed, assigns stages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keep subcommand form (`coordinator inspect`) even while there is one command."""


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 0.0.0.0 for a public VPS.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (remembered in --state-dir).")] = 0,
    state_dir: Annotated[Path, typer.Option(help="Where identity, state and addresses persist.")] = Path(
        "coordinator-state"
    ),
    http_port: Annotated[
        int | None,
        typer.Option(
            help="Serve a status page, /status (JSON) and /metrics (Prometheus) on this port; 0 picks one.",
            min=0,
            max=65535,
        ),
    ] = None,
    http_token_file: Annotated[
        Path | None,
        typer.Option(
            help="Require the bearer token in this file (mode 0600) for /status and /metrics, and serve "
            "them on --host; without it they listen on 127.0.0.1 only."
        ),
    ] = None,
    http_host: Annotated[
        str | None,
        typer.Option(
            help="Interface for the status page; default: --host with --http-token-file, else 127.0.0.1."
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="Use the join token in this file (mode 0600) instead of $PMNODE_JOIN_TOKEN or the one "
            "kept in --state-dir; without any, a new token is made and shown once."
        ),
    ] = None,
    relay: Annotated[
        bool, typer.Option("--relay/--no-relay", help="Relay for volunteers that cannot be dialed back.")
    ] = True,
    relay_time_limit: Annotated[
        str,
        typer.Option(
            help="How long one relayed circuit may stay open (hivemind 1.1.12's p2pd ignores it: 2 minutes)."
        ),
    ] = "30m",
    relay_data_limit: Annotated[
        str,
        typer.Option(
            help="Bytes one relayed circuit may carry each way (hivemind 1.1.12's p2pd ignores it: 128 KiB)."
        ),
    ] = "4GB",
    relay_peer: Annotated[
        list[str] | None,
        typer.Option(
            help="A member (peer id) that may relay for members behind NAT, if it joined with --relay; "
            "repeat for several. Others' --relay is ignored: a relay sees and can delay what it carries."
        ),
    ] = None,
) -> None:
    """Start the DHT bootstrap peer, hand out the run config and assign stages."""
    from coordinator.server import Coordinator
    from pmnode.data.manifest import is_prepared
    from pmnode.data.resolve import pin
    from pmnode.errors import PmnodeError
    from pmnode.net.relay import relay_limits
    from pmnode.net.tokens import read_token_file, resolve_token

    if http_token_file is not None and http_port is None:
        raise PmnodeError("--http-token-file protects the status page: add --http-port PORT (0 picks one)")
    http_token = read_token_file(http_token_file) if http_token_file is not None else None
    cfg = load_run_config(config)
    check_for_swarm(cfg.replica_sync, cfg.swarm.schedule)
    if is_prepared(Path(cfg.data.source)):  # hand out the data's hashes: a head with other data is refused
        cfg, _ = pin(cfg)
    token = resolve_token(token_file)
    limits = relay_limits(relay, relay_time_limit, relay_data_limit)
    Coordinator(
        cfg,
        host=host,
        port=port,
        state_dir=state_dir,
        console=Console(stderr=True),
        http_port=http_port,
        token=token,
        relay=limits,
        http_host=http_host,
        http_token=http_token,
        relay_peers=relay_peer or (),
    ).serve()


@app.command()
def inspect(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bandwidth: Annotated[
        str | None, typer.Option(help="A volunteer's link per direction, e.g. 80mbit: which k it carries.")
    ] = None,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="A stage's training rate in tokens/s (with --bandwidth).", min=0)
    ] = None,
    gpu_memory: Annotated[
        str | None, typer.Option(help="A volunteer's device memory, e.g. 24GB: which stages fit it.")
    ] = None,
    fingerprint: Annotated[
        bool | None,
        typer.Option(
            "--fingerprint/--no-fingerprint",
            help="Build U and F to print their fingerprint; default: only when F is under 64M entries "
            "(a 128k vocabulary at d = 4096 takes minutes and 8 GB).",
        ),
    ] = None,
) -> None:
    """Validate a run config; show its stage split, fingerprint, per-stage sizes and what each k costs."""
    from coordinator.sizes import print_sizes, sizes_json
    from pmnode.core.sizing import parse_size, stage_sizes
    from pmnode.net.shaping import parse_bandwidth
    from pmnode.plan.advice import advise, recommended

    cfg = load_run_config(config)
    advice = advise(cfg, parse_bandwidth(bandwidth) if bandwidth else None, tokens_per_s)
    best = recommended(advice)
    memory = parse_size(gpu_memory) if gpu_memory else None
    sizes = stage_sizes(cfg)
    if fingerprint is None:
        fingerprint = cfg.model.vocab_size * cfg.model.d_model <= 2**26
    sub = build_subspace(cfg) if fingerprint else None
    ranges = split_layers(cfg.model.n_layers, cfg.n_stages, cfg.stage_layers)
    free = free_layers(cfg) if cfg.subspace.enabled else range(0)
    info = {
        "name": cfg.name,
        "d_model": cfg.model.d_model,
        "compression_rank": cfg.rank if cfg.subspace.enabled else None,
        "fingerprint": sub.fingerprint if sub is not None else None,
        "stages": [{"stage": i, "layers": [r.start, r.stop]} for i, r in enumerate(ranges)],
        "uncompressed_layers": list(free),
        "sizes": sizes_json(sizes, memory),
        "compression": [a.model_dump() for a in advice],
        "recommended_rank": best.rank if best else None,
        "recommended": best.model_dump() if best else None,
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = Console()
    console.print(
        f"run [bold]{cfg.name}[/]: d={cfg.model.d_model}, k={info['compression_rank']}, "
        f"fingerprint {info['fingerprint'] or 'not computed (--fingerprint)'}"
    )
    table = Table("stage", "layers", "role")
    for i, r in enumerate(ranges):
        role = "head" if i == 0 else "tail" if i == len(ranges) - 1 else "body"
        table.add_row(str(i), f"{r.start}..{r.stop - 1}", role)
    console.print(table)
    print_sizes(console, sizes, memory)
    print_advice(console, advice, best)


def print_advice(console: Console, advice: list[RankAdvice], best: RankAdvice | None) -> None:
    """The config's own boundary first, then each other way to compress it, cheapest on the wire
    first, with the long-run cost the fidelity study measured at the same d/k, on every corpus it
    was measured on (docs/benchmarks/fidelity)."""
    from pmnode.plan.advice import spread_text

    table = Table("codec", "setting", "B/token", "link tok/s", "measured cost", title="compression")
    for a in advice:
        m = a.measured
        if m is None:
            cost = "not measured"
        else:
            plain = f"{100 * (m.gap_plain or 0):+.1f}% vs plain"
            vs = f"{100 * m.gap:+.1f}%" if m.gap is not None else plain
            steps = f", {m.steps_ratio:.2f}x steps" if m.steps_ratio else ", target not reached"
            cut = "" if m.complete else ", cut short"
            cost = f"{vs} at {m.tokens / 1e6:.1f}M tokens{steps} (d={m.d_model}, {m.corpus}{cut})"
            cost = spread_text(a) or cost
        carried = f"{a.link_tokens_per_s:,.0f}" if a.link_tokens_per_s is not None else "-"
        style = "bold green" if a is best else ("dim" if a.fits is False else None)
        name = f"{a.codec}@{a.rank}" + (" (shipped)" if a.shipped else "")
        table.add_row(name, a.setting, str(a.bytes_per_token), carried, cost, style=style)
    console.print(table)
    console.print(
        "cost: held-out loss against the same model unconstrained (k = d) at equal tokens (the study's "
        "d and corpus in brackets; the range over corpora where measured on several); steps: to that "
        "model's final loss. remedy: subspace.preset remedy (full width inside a stage, token/pair/"
        "triple tables); paper: subspace.preset paper (every write in span(U))",
        style="dim",
    )
    if best is not None:
        console.print(f"recommended for this link: [bold]{best.codec}@{best.rank}[/] ({best.setting})")


def main() -> None:
    run_cli(app)
