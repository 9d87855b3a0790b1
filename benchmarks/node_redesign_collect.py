"""Collects the interleaved before/after runs of benchmarks/swarm_throughput.py into results.json and
results.md.

    python -m benchmarks.node_redesign_collect RUNS_DIR
RUNS_DIR holds {before,after}-{tiny,small}-{round}/results.json, in the order they ran.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "swarm-throughput" / "node-redesign"


def main(runs: Path) -> None:
    rows = []
    for d in sorted(runs.glob("*-*-*")):
        side, config, rnd = d.name.split("-")
        if not (d / "results.json").exists():
            continue
        (r,) = json.loads((d / "results.json").read_text())["runs"]
        rows.append({**r, "side": side, "config": config, "round": int(rnd)})
    (HERE / "results.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    md = [
        "| config | round | side | single tok/s | sync tok/s | async tok/s | sync held-out "
        "| async held-out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["config"] != "tiny", r["round"], r["side"] != "before")):
        md.append(
            f"| {r['config']} | {r['round']} | {r['side']} | {r['single_tokens_per_s']:,.0f} | "
            f"{r['sync_tokens_per_s']:,.0f} | {r['async_tokens_per_s']:,.0f} | "
            f"{r['sync_heldout_loss']:.4f} | {r['async_heldout_loss']:.4f} |"
        )
    md += ["", "| config | schedule | before (median) | after (median) | after / before |"]
    md += ["|---|---|---|---|---|"]
    for config in ("tiny", "small"):
        for sched in ("sync", "async"):
            b = [r[f"{sched}_tokens_per_s"] for r in rows if r["config"] == config and r["side"] == "before"]
            a = [r[f"{sched}_tokens_per_s"] for r in rows if r["config"] == config and r["side"] == "after"]
            if a and b:
                mb, ma = statistics.median(b), statistics.median(a)
                md.append(f"| {config} | {sched} | {mb:,.0f} | {ma:,.0f} | {ma / mb:.2f} |")
    (HERE / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
