"""`pmnode bench time-to-loss --config`: wall time to a held-out loss, trained over an emulated link.

For one config, every variant (sync, or async with a stale-gradient correction) trains a real local
swarm twice, over the link (bandwidth + one-way latency, shaped in-process) and over an unshaped
link, one run at a time with the same model, seed, data and steps. The runs alternate variants
within each link, so load from other work on the machine falls on all of them alike. Every run's
head lines give held-out loss against steps and wall seconds (since the first micro-batch); time to
target is the wall time until held-out first reaches the target (linear between evaluations). The
default target is the sync run's final held-out on the unlimited link: the loss a user gets without
a slow link. The figure that matters is each variant's time over the link against the same swarm's
(same variant, same settings) on the unlimited link.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from pmnode.bench.plotting import pyplot
from pmnode.bench.swarm import head_lines
from pmnode.bench.time_to_loss import tokens_to_reach
from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.net.shaping import parse_bandwidth, parse_latency
from pmnode.swarm.local_swarm import run_local_swarm

UNLIMITED = "unlimited"
VARIANTS = ("sync", "none", "nesterov", "predict")
# A run reaches the target within this fraction: two sync runs of the same steps differ by ~1e-4 in
# held-out (the order micro-batch gradients are summed in), which must not read as "never reached".
SLACK = 1e-3

Runner = Callable[[RunConfig, str], dict]  # (config, link) -> the measured run (see measure)


def parse_link(link: str) -> tuple[str, str]:
    """'80mbit+50ms' -> ('80mbit', '50ms'); 'unlimited' -> unshaped. A bad link is one clear error."""
    bw, _, lat = link.partition("+")
    parse_bandwidth(bw)
    parse_latency(lat or "0ms")
    if parse_bandwidth(bw) is None and lat:
        raise PmnodeError(f"link {link!r}: 'unlimited' takes no latency (it is the unshaped baseline)")
    return bw, lat or "0ms"


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """sync, or async with a correction; `correction@N` keeps N in flight instead of the config's."""
    name, _, window = variant.partition("@")
    if name not in VARIANTS:
        raise PmnodeError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)} (optionally @N)")
    if window and not (window.isdigit() and int(window) >= 1):
        raise PmnodeError(f"variant {variant!r}: the window after @ must be a positive integer")
    sw: dict = {"schedule": "sync"} if name == "sync" else {"schedule": "async", "async_correction": name}
    if window:
        sw["max_inflight"] = int(window)
    return cfg.with_overrides(swarm=sw)


def measure(cfg: RunConfig, link: str, *, stages: int, console: Console) -> dict:
    """One local swarm over `link`: held-out curve against steps and wall seconds, tokens/s, window."""
    bw, lat = parse_link(link)
    with tempfile.TemporaryDirectory(prefix="pmnode-ttl-") as d:
        summary = run_local_swarm(
            cfg,
            stages=stages,
            replicas=1,
            workdir=Path(d) / "swarm",
            console=console,
            node_args=["--link-bandwidth", bw, "--link-latency", lat],
        )
        lines = head_lines(Path(d) / "swarm" / "logs" / "node-0.log")
    if not lines:
        raise PmnodeError(f"the swarm over {link} reported no steps")
    # The whole run's rate, evaluations included (the same for every variant): async's head lines come
    # in bursts as the window moves, so rates over a few steps mislead.
    evals = [[ln.step, round(ln.elapsed, 3), round(ln.heldout_loss, 4)] for ln in lines if ln.heldout_loss]
    return {
        "heldout_loss": round(summary.heldout_loss or float("nan"), 4),
        "tokens_per_s": round(lines[-1].tokens / lines[-1].elapsed, 1) if lines[-1].elapsed > 0 else 0.0,
        "wall_s": round(lines[-1].elapsed, 2),
        "mean_inflight": round(sum(ln.inflight or 0 for ln in lines) / len(lines), 1),
        "evals": evals,
    }


def time_to(evals: list[list[float]], target: float) -> float | None:
    """Wall seconds at which a held-out curve [step, seconds, loss] first reaches `target`."""
    return tokens_to_reach([[t, h] for _, t, h in evals], target)


def run_all(
    cfg: RunConfig,
    *,
    link: str,
    variants: list[str],
    runs: list[dict],
    runner: Runner,
    save: Callable[[list[dict]], None],
) -> list[dict]:
    """Every (link, variant) not yet in `runs`, unlimited first, variants alternating within a link;
    `save` after each, so an interrupted sweep resumes."""
    parse_link(link)
    for lk in (UNLIMITED, link) if link != UNLIMITED else (UNLIMITED,):
        for v in variants:
            if any(r["link"] == lk and r["variant"] == v for r in runs):
                continue
            runs.append({"link": lk, "variant": v, **runner(variant_config(cfg, v), lk)})
            save(runs)
    return runs


def summarize(runs: list[dict], link: str, target: float | None) -> dict:
    """The target and, per run: held-out vs sync on its link, throughput and time to target vs the
    same variant unlimited."""
    sync_free = next((r for r in runs if r["link"] == UNLIMITED and r["variant"] == "sync"), None)
    if target is None:
        if sync_free is None:
            raise PmnodeError("no target: give --target, or include sync among the variants")
        target = sync_free["heldout_loss"]
    reach = target * (1 + SLACK)
    rows = []
    for r in runs:
        sync = next((s for s in runs if s["link"] == r["link"] and s["variant"] == "sync"), None)
        free = next((s for s in runs if s["link"] == UNLIMITED and s["variant"] == r["variant"]), None)
        secs = time_to(r["evals"], reach)
        free_secs = time_to(free["evals"], reach) if free else None
        rows.append(
            {
                **{k: v for k, v in r.items() if k != "evals"},
                "vs_sync": r["heldout_loss"] / sync["heldout_loss"] - 1 if sync else None,
                "throughput_vs_unlimited": r["tokens_per_s"] / free["tokens_per_s"] if free else None,
                "seconds_to_target": secs,
                "time_vs_unlimited": secs / free_secs if secs and free_secs else None,
                "evals": r["evals"],
            }
        )
    return {"target": target, "link": link, "rows": rows}


def bench(
    cfg: RunConfig,
    *,
    out: Path,
    link: str,
    variants: list[str],
    stages: int,
    target: float | None,
    command: str,
    title: str,
    console: Console,
) -> dict:
    """Measure what OUT/results.json lacks, then write the report; returns what it wrote."""
    for v in variants:
        variant_config(cfg, v)  # a bad variant fails here, before any run
    saved = out / "results.json"
    runs: list[dict] = json.loads(saved.read_text())["runs"] if saved.is_file() else []
    head = {"command": command, "config": title, "stages": stages, "steps": cfg.train.steps}
    title = f"{title}, {stages} stages, {cfg.train.steps} steps, {link}"

    def save(rs: list[dict]) -> None:
        have_target = target is not None or any(r["link"] == UNLIMITED and r["variant"] == "sync" for r in rs)
        if have_target:
            write(out, {**head, **summarize(rs, link, target), "runs": rs}, title)
        else:  # no target yet: keep the runs for the resume
            out.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({**head, "runs": rs}, indent=2))

    def runner(c: RunConfig, lk: str) -> dict:
        console.print(f"[bold]{c.swarm.schedule} ({c.swarm.async_correction})[/] over {lk}")
        return measure(c, lk, stages=stages, console=console)

    run_all(cfg, link=link, variants=variants, runs=runs, runner=runner, save=save)
    save(runs)
    return json.loads(saved.read_text())


def write(out: Path, result: dict, title: str) -> None:
    """results.json, results.md (the table) and time_to_loss.png (held-out against wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    pct = lambda x: "-" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        f"# Time to loss: {title}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Target held-out loss {result['target']:.4f} (default: sync's final on the unlimited link), reached "
        f"within {SLACK:.1%}. "
        "'vs unlimited': the same variant and settings on an unshaped link.",
        "",
        "| link | variant | held-out | vs sync | tokens/s | vs unlimited | mean window | time to target "
        "| vs unlimited |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        secs = r["seconds_to_target"]
        lines.append(
            f"| {r['link']} | {r['variant']} | {r['heldout_loss']:.4f} | {pct(r['vs_sync'])} | "
            f"{r['tokens_per_s']:,.0f} | {ratio(r['throughput_vs_unlimited'])} | {r['mean_inflight']:g} | "
            f"{'not reached' if secs is None else f'{secs:,.0f} s'} | {ratio(r['time_vs_unlimited'])} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(out, result)


def _plot(out: Path, result: dict) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in result["rows"]:
        style = "-" if r["link"] != UNLIMITED else ":"
        for ax, col in zip(axes, (1, 0), strict=True):
            xs, ys = [e[col] for e in r["evals"]], [e[2] for e in r["evals"]]
            ax.plot(xs, ys, style, marker=".", label=f"{r['variant']}, {r['link']}")
    axes[0].axhline(result["target"], color="gray", linestyle="--", linewidth=1, label="target")
    for ax, label in zip(axes, ("wall seconds", "optimizer step"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_to_loss.png", dpi=110)
    plt.close(fig)
