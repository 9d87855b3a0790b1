r"""What async staleness costs in convergence: one local swarm per (schedule, micro-batches in flight).

    python -m benchmarks.staleness --config configs/tiny.yaml --stages 4 --steps 600 \
        --inflight sync,4,32,96,160 --out docs/benchmarks/staleness

Every run has the same model, seed, data and steps; only the schedule and `swarm.max_inflight`
change. `sync` flushes the pipeline before every step (no staleness: it equals `pmnode train`).
In async, a micro-batch's forward can run up to max_inflight / (micro-batches per step) optimizer
steps before its backward is applied (weight stashing keeps its backward consistent with its own
forward). Writes results.json, results.md and heldout.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.launch import local_swarm, node_summaries
from pmnode.bench.plotting import pyplot
from pmnode.swarm.local_swarm import SwarmSummary


def run_swarm(raw: dict, stages: int) -> tuple[SwarmSummary, list[tuple[int, int, float]]]:
    """The swarm's summary and the head's evaluations (step, tokens, held-out loss)."""
    with tempfile.TemporaryDirectory() as d:
        cfg, work = Path(d) / "config.yaml", Path(d) / "work"
        cfg.write_text(yaml.safe_dump(raw))
        summary = local_swarm(["--config", str(cfg), "--stages", str(stages)], work)
        return summary, node_summaries(work)["node-0"].evals or []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--inflight", default="sync,4,32,96,160", help="sync, or micro-batches in flight")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/staleness"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text())
    base["n_stages"] = args.stages
    base.setdefault("train", {}).update(steps=args.steps, eval_every=args.eval_every)
    t = base["train"]
    n_micro = t["batch_size"] // t.get("micro_batch_size", t["batch_size"])
    rows = []
    for item in args.inflight.split(","):
        raw = json.loads(json.dumps(base))
        sw = raw.setdefault("swarm", {})
        if item == "sync":
            sw.update(schedule="sync")
        else:
            sw.update(schedule="async", max_inflight=int(item))
        s, evals = run_swarm(raw, args.stages)
        inflight = None if item == "sync" else int(item)
        rows.append(
            {
                "schedule": sw["schedule"],
                "max_inflight": inflight,
                "staleness_steps": 0 if inflight is None else inflight / n_micro,
                "heldout_loss": round(s.heldout_loss, 4) if s.heldout_loss is not None else None,
                "final_train_loss": round(s.final_train_loss, 4),
                "tokens_per_s": round(s.tokens_per_s, 1),
                "curve": [[step, round(loss, 4)] for step, _, loss in evals],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    plt = pyplot()
    command = "python " + " ".join(sys.argv)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "config": args.config,
                "stages": args.stages,
                "steps": args.steps,
                "runs": rows,
                "command": command,
            },
            indent=2,
        )
    )
    sync = next((r["heldout_loss"] for r in rows if r["schedule"] == "sync"), None)
    lines = [
        f"# Staleness against convergence: {args.config}, {args.stages} stages, {args.steps} steps",
        "",
        f"Command: `{command}`",
        "",
        "| schedule | micro-batches in flight | up to steps stale | held-out loss | vs sync | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{100 * (r['heldout_loss'] / sync - 1):+.1f}%" if sync else "-"
        lines.append(
            f"| {r['schedule']} | {r['max_inflight'] or '-'} | {r['staleness_steps']:g} | "
            f"{r['heldout_loss']:.4f} | {rel} | {r['tokens_per_s']:,.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        label = "sync" if r["schedule"] == "sync" else f"async, {r['max_inflight']} in flight"
        ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"staleness: {Path(args.config).stem}, {args.stages} stages")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "heldout.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
