r"""Local swarm tokens/s against single-process `pmnode train`, same machine, config and steps.

    python -m benchmarks.swarm_throughput --configs configs/tiny.yaml,configs/small.yaml --steps 60 \
        --out docs/benchmarks/swarm-throughput

Both sides measure tokens over the time spent training (evaluation excluded on the single-process
side; the swarm's head counts wall time from its first micro-batch, evaluations included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import launch
from pmnode.bench.plotting import pyplot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="configs/tiny.yaml,configs/small.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/swarm-throughput"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs.split(","):
        raw = yaml.safe_load(Path(config).read_text())
        raw["n_stages"] = args.stages
        raw.pop("stage_layers", None)
        tail_layers = raw["model"]["n_layers"] // args.stages  # the even split's smallest stage is the tail
        sub = raw.setdefault("subspace", {})
        sub["uncompressed_tail_layers"] = min(sub.get("uncompressed_tail_layers", 2), tail_layers)
        train = raw.setdefault("train", {})
        train.update(steps=args.steps, eval_every=10**6)  # evaluate at the end only
        # Pipelining needs several micro-batches per step; both sides use the same split.
        train.setdefault("micro_batch_size", max(1, train.get("batch_size", 16) // 4))
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d) / "config.yaml"
            cfg.write_text(yaml.safe_dump(raw))
            single = launch.train(cfg, Path(d) / "single.json")
            row = {
                "config": config,
                "stages": args.stages,
                "steps": args.steps,
                "single_tokens_per_s": round(single.tokens_per_s, 1),
            }
            for schedule in ("sync", "async"):
                swarm = launch.local_swarm(
                    ["--config", str(cfg), "--stages", str(args.stages), "--schedule", schedule],
                    Path(d) / f"work-{schedule}",
                )
                row[f"{schedule}_tokens_per_s"] = round(swarm.tokens_per_s, 1)
                row[f"{schedule}_ratio"] = round(swarm.tokens_per_s / single.tokens_per_s, 3)
                row[f"{schedule}_heldout_loss"] = (
                    round(swarm.heldout_loss, 4) if swarm.heldout_loss is not None else None
                )
            row["single_heldout_loss"] = round(single.heldout_loss, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = " ".join(["python", *sys.argv])
    (args.out / "results.json").write_text(json.dumps({"command": command, "runs": rows}, indent=2))
    md = [
        f"Command: `{command}`",
        "",
        "| config | stages | steps | single tok/s | sync tok/s (ratio) | async tok/s (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['config']} | {r['stages']} | {r['steps']} | {r['single_tokens_per_s']:,.0f} | "
            f"{r['sync_tokens_per_s']:,.0f} ({r['sync_ratio']:.2f}) | "
            f"{r['async_tokens_per_s']:,.0f} ({r['async_ratio']:.2f}) |"
        )
    (args.out / "results.md").write_text("\n".join(md) + "\n")

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [Path(r["config"]).stem for r in rows]
    xs = range(len(rows))
    for i, (key, name) in enumerate(
        [("single", "pmnode train"), ("sync", "swarm sync"), ("async", "swarm async")]
    ):
        ax.bar([x + 0.27 * (i - 1) for x in xs], [r[f"{key}_tokens_per_s"] for r in rows], 0.27, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"local swarm ({args.stages} processes) vs one process, same 2-core machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)


if __name__ == "__main__":
    main()
