r"""Async against sync over emulated slow links, with and without stale-gradient correction.

    python -m benchmarks.async_links --config configs/tiny.yaml --stages 4 --steps 300 \
        --links unlimited,80mbit+50ms,20mbit+100ms --variants sync,none,nesterov,predict \
        --out docs/benchmarks/async

One local swarm per (link, variant), one at a time: the same model, seed, data and steps; only the
schedule and `swarm.async_correction` change (`swarm.max_inflight: auto` for all). Every run's head
lines give held-out loss against steps and wall time (seconds since the first micro-batch); tokens/s
is the whole run's (evaluations included). Time to target = wall
time until the held-out loss first reaches the target (linear between evaluations). Runs already in
OUT/results.json are kept, so an interrupted sweep resumes. Writes results.json, results.md,
heldout_steps.png and heldout_time.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

from pmnode.bench.plotting import pyplot
from pmnode.bench.swarm import head_lines
from pmnode.bench.time_to_loss import tokens_to_reach
from pmnode.config import RunConfig
from pmnode.swarm.local_swarm import run_local_swarm

NEAR = 0.02  # 'near sync': within this fraction of sync's final held-out loss


def run_config(base: dict, variant: str) -> RunConfig:
    """sync, or an async correction; `correction@N` keeps N micro-batches in flight instead of auto."""
    raw = json.loads(json.dumps(base))
    sw = raw.setdefault("swarm", {})
    name, _, window = variant.partition("@")
    sw["max_inflight"] = int(window) if window else "auto"
    if name == "sync":
        sw["schedule"] = "sync"
    else:
        sw.update(schedule="async", async_correction=name)
    return RunConfig.model_validate(raw)


def run_one(cfg: RunConfig, stages: int, link: str, console: Console) -> dict:
    bw, _, lat = link.partition("+")
    with tempfile.TemporaryDirectory(prefix="pmnode-async-") as d:
        summary = run_local_swarm(
            cfg,
            stages=stages,
            replicas=1,
            workdir=Path(d) / "swarm",
            console=console,
            node_args=["--link-bandwidth", bw, "--link-latency", lat or "0ms"],
        )
        lines = head_lines(Path(d) / "swarm" / "logs" / "node-0.log")
    # The whole run's rate (evaluations included, the same for every variant): async's head lines come
    # in bursts as the window moves, so windowed rates at the head mislead.
    rate = lines[-1].tokens / lines[-1].elapsed if lines else 0.0
    evals = [(ln.step, ln.elapsed, ln.heldout_loss) for ln in lines if ln.heldout_loss is not None]
    return {
        "heldout_loss": round(summary.heldout_loss or float("nan"), 4),
        "final_train_loss": round(summary.final_train_loss, 4),
        "tokens_per_s": round(rate, 1),
        "mean_inflight": round(sum(ln.inflight or 0 for ln in lines) / max(len(lines), 1), 1),
        "final_inflight": lines[-1].inflight if lines else None,
        "evals": [[s, round(t, 3), round(h, 4)] for s, t, h in evals],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--links", default="unlimited,80mbit+50ms,20mbit+100ms")
    ap.add_argument("--variants", default="sync,none,nesterov,predict")
    ap.add_argument("--target", type=float, default=None, help="held-out target; default: worst final")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/async"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text())
    base["n_stages"] = args.stages
    base.setdefault("train", {}).update(
        steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        eval_every=args.eval_every,
    )
    out_json = args.out / "results.json"
    runs: list[dict] = json.loads(out_json.read_text())["runs"] if out_json.is_file() else []
    console = Console(stderr=True)
    for link in args.links.split(","):
        for variant in args.variants.split(","):
            if any(r["link"] == link and r["variant"] == variant for r in runs):
                continue
            console.print(f"[bold]{variant}[/] over {link}")
            measured = run_one(run_config(base, variant), args.stages, link, console)
            r = {"link": link, "variant": variant, **measured}
            console.print({k: v for k, v in r.items() if k != "evals"})
            runs.append(r)
            write(args, base, runs)
    if runs:
        write(args, base, runs)  # tables from the runs already measured, with this script's targets


def time_to(evals: list[list[float]], target: float) -> float | None:
    """Wall seconds at which the held-out curve first reaches `target` (linear between evaluations)."""
    return tokens_to_reach([[t, h] for _, t, h in evals], target)


def targets(args: argparse.Namespace, runs: list[dict]) -> dict[str, float]:
    """Per link: --target, else the worst final held-out loss of its variants (every one reaches it)."""
    links = dict.fromkeys(r["link"] for r in runs)
    return {ln: args.target or max(r["heldout_loss"] for r in runs if r["link"] == ln) for ln in links}


def write(args: argparse.Namespace, base: dict, runs: list[dict]) -> None:
    target = targets(args, runs)
    for r in runs:
        sync = next((s for s in runs if s["link"] == r["link"] and s["variant"] == "sync"), None)
        r["target"] = target[r["link"]]
        r["seconds_to_target"] = time_to(r["evals"], target[r["link"]])
        near = sync["heldout_loss"] * (1 + NEAR) if sync else None
        r["seconds_to_near_sync"] = time_to(r["evals"], near) if near else None
    command = "python " + " ".join(sys.argv)
    result = {"command": command, "config": base, "stages": args.stages, "targets": target, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    t = base["train"]
    lines = [
        f"# Async over slow links: {args.config}, {args.stages} stages, {args.steps} steps",
        "",
        f"Command: `{command}`",
        "",
        f"batch {t['batch_size']} x {t['seq_len']} tokens in {t['batch_size'] // t['micro_batch_size']} "
        f"micro-batches per step; max_inflight auto. Target held-out loss per link: the worst final of "
        f"its variants; 'to sync +{100 * NEAR:g}%': wall time until within {100 * NEAR:g}% of sync's final.",
        "",
        "| link | variant | held-out | vs sync | tokens/s | vs own unlimited | window | target "
        f"| time to target | to sync +{100 * NEAR:g}% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        sync = next((s for s in runs if s["link"] == r["link"] and s["variant"] == "sync"), None)
        free = next((s for s in runs if s["link"] == "unlimited" and s["variant"] == r["variant"]), None)
        rel = f"{100 * (r['heldout_loss'] / sync['heldout_loss'] - 1):+.1f}%" if sync else "-"
        thr = f"{r['tokens_per_s'] / free['tokens_per_s']:.2f}" if free and free["tokens_per_s"] else "-"
        secs, near = r["seconds_to_target"], r["seconds_to_near_sync"]
        lines.append(
            f"| {r['link']} | {r['variant']} | {r['heldout_loss']:.4f} | {rel} | {r['tokens_per_s']:,.0f} | "
            f"{thr} | {r['mean_inflight']:g} | {r['target']:.4f} | {seconds(secs)} | {seconds(near)} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(args.out, runs, target)


def seconds(s: float | None) -> str:
    return "not reached" if s is None else f"{s:.0f} s"


def plot(out: Path, runs: list[dict], target: dict[str, float]) -> None:
    plt = pyplot()

    links = list(dict.fromkeys(r["link"] for r in runs))
    for name, col, label in (("heldout_steps", 0, "optimizer step"), ("heldout_time", 1, "wall seconds")):
        fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4.2), squeeze=False)
        for ax, link in zip(axes[0], links, strict=True):
            for r in (r for r in runs if r["link"] == link):
                xs, ys = [e[col] for e in r["evals"]], [e[2] for e in r["evals"]]
                ax.plot(xs, ys, marker=".", label=r["variant"])
            if col == 1:
                ax.axhline(target[link], color="gray", linestyle="--", linewidth=1, label="target")
            ax.set_title(link)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
