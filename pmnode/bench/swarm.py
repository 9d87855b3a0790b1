"""`pmnode bench swarm`: local-swarm throughput per codec and emulated link, at steady state.

Every (codec, bandwidth) pair runs a real local swarm (coordinator + one process per stage) with
its nodes' links shaped in-process (pmnode.net.shaping). The head's per-step lines give tokens and
elapsed time; tokens/s is measured over windows of steps, and the run is at steady state once
three consecutive windows agree within `tolerance`. The figure reported is the median of the
windows from there on. 'unlimited' means an unshaped link: no bandwidth cap and no added latency.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console

from pmnode.bench.plotting import pyplot
from pmnode.config import RunConfig
from pmnode.core.train import config_for
from pmnode.net.shaping import format_bandwidth, parse_bandwidth, parse_latency
from pmnode.swarm.local_swarm import run_local_swarm
from pmnode.swarm.report import StepLine


def window_rates(lines: list[StepLine], window: int) -> list[float]:
    """tokens/s over consecutive windows of `window` steps, from the head's per-step lines."""
    rates = []
    for i in range(window, len(lines), window):
        a, b = lines[i - window], lines[i]
        dt = b.elapsed - a.elapsed
        if dt > 0:
            rates.append((b.tokens - a.tokens) / dt)
    return rates


def steady_rate(rates: list[float], tolerance: float = 0.05) -> tuple[float, bool, int]:
    """(median rate, steady?, first steady window). Falls back to the last half when never steady."""
    for i in range(len(rates) - 2):
        trio = rates[i : i + 3]
        if max(trio) <= (1 + tolerance) * min(trio):
            return statistics.median(rates[i:]), True, i
    tail = rates[len(rates) // 2 :] or rates
    return (statistics.median(tail) if tail else 0.0), False, -1


def head_lines(log: Path) -> list[StepLine]:
    """The head's per-step lines in its log, other output skipped."""
    return [line for raw in log.read_text().splitlines() if (line := StepLine.parse(raw)) is not None]


def run_one(
    cfg: RunConfig,
    *,
    stages: int,
    codec: str,
    bandwidth: str,
    latency: str,
    window: int,
    console: Console,
) -> dict:
    run_cfg, _ = config_for(cfg, codec)
    shaped = parse_bandwidth(bandwidth) is not None
    lat = latency if shaped else "0ms"  # the unlimited baseline is an unshaped link
    with tempfile.TemporaryDirectory(prefix="pmnode-bench-") as d:
        work = Path(d)
        summary = run_local_swarm(
            run_cfg,
            stages=stages,
            replicas=1,
            workdir=work / "swarm",
            console=console,
            node_args=["--link-bandwidth", bandwidth, "--link-latency", lat],
        )
        lines = head_lines(work / "swarm" / "logs" / "node-0.log")
    rates = window_rates(lines, window)
    rate, steady, first = steady_rate(rates)
    return {
        "codec": codec,
        "bandwidth": format_bandwidth(parse_bandwidth(bandwidth)),
        "latency_ms": round(parse_latency(lat) * 1e3, 3),
        "tokens_per_s": round(rate, 1),
        "steady": steady,
        "steady_from_step": (first * window) if steady else None,
        "window_rates": [round(r, 1) for r in rates],
        "wire_bytes_per_token_per_boundary": summary.wire_bytes_per_token_per_boundary,
        "steps": summary.steps,
        "final_train_loss": round(summary.final_train_loss, 4),
    }


def bench_swarm(
    cfg: RunConfig,
    *,
    stages: int,
    codecs: list[str],
    bandwidths: list[str],
    latency: str,
    out: Path,
    window: int,
    console: Console,
    command: str,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for b in bandwidths:
        parse_bandwidth(b)  # every flag error before the first (minutes-long) run
    parse_latency(latency)
    runs: list[dict] = []
    for codec in codecs:
        for bw in bandwidths:
            console.print(f"[bold]{codec}[/] at {bw}, {latency}: {stages} stages")
            r = run_one(
                cfg, stages=stages, codec=codec, bandwidth=bw, latency=latency, window=window, console=console
            )
            console.print(
                f"  {r['tokens_per_s']:,.0f} tokens/s ({'steady' if r['steady'] else 'NOT steady'}), "
                f"{r['wire_bytes_per_token_per_boundary']['forward']:.1f} B/token/boundary forward"
            )
            runs.append(r)
            write(out, cfg, stages, runs, command)
    return {"runs": runs}


def write(out: Path, cfg: RunConfig, stages: int, runs: list[dict], command: str) -> None:
    plt = pyplot()

    (out / "results.json").write_text(
        json.dumps(
            {"command": command, "stages": stages, "config": cfg.model_dump(mode="json"), "runs": runs},
            indent=2,
        )
    )
    base = {r["codec"]: r["tokens_per_s"] for r in runs if r["bandwidth"] == "unlimited"}
    lines = [
        f"Command: `{command}`",
        "",
        f"{cfg.name}: d={cfg.model.d_model}, {cfg.model.n_layers} layers over {stages} stages, "
        f"batch {cfg.train.batch_size}x{cfg.train.seq_len}, {cfg.swarm.schedule}, "
        f"max_inflight {cfg.swarm.max_inflight}. Latency is one way, per link; 'unlimited' is unshaped.",
        "",
        "| codec | bandwidth | latency | tokens/s | vs own unlimited | steady | fwd B/token/boundary |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rel = f"{r['tokens_per_s'] / base[r['codec']]:.2f}" if base.get(r["codec"]) else "-"
        lines.append(
            f"| {r['codec']} | {r['bandwidth']} | {r['latency_ms']:g} ms | {r['tokens_per_s']:,.0f} | {rel} "
            f"| {'yes' if r['steady'] else 'no'} | {r['wire_bytes_per_token_per_boundary']['forward']:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = list(dict.fromkeys(r["bandwidth"] for r in runs))
    for codec in dict.fromkeys(r["codec"] for r in runs):
        pts = [(order.index(r["bandwidth"]), r["tokens_per_s"]) for r in runs if r["codec"] == codec]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=codec)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("emulated link bandwidth (latency applies to shaped links)")
    ax.set_ylabel("steady-state tokens/s")
    ax.set_title(f"{cfg.name}, {stages} stages: throughput over slow links")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
