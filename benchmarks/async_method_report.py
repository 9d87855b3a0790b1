"""Tables and a plot from `benchmarks.async_method` results: every run against sync at equal steps.

    python -m benchmarks.async_method_report docs/benchmarks/async/method/tiny ... \
        --out docs/benchmarks/async/method

Writes results.md (one table per config) and gap.png (held-out against sync, per step) in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmnode.bench.plotting import pyplot


def load(d: Path) -> tuple[str, dict, list[dict]]:
    data = json.loads((d / "results.json").read_text())
    return d.name, data, data["runs"]


def gaps(run: dict, sync: dict[int, float]) -> dict[int, float]:
    return {step: h / sync[step] - 1 for step, h in run["evals"] if step in sync}


def table(name: str, data: dict, runs: list[dict]) -> list[str]:
    sync = dict(next(r for r in runs if r["name"] == "sync")["evals"])
    steps = sorted(sync)
    marks = [s for s in steps if s % 100 == 0] or steps[-1:]
    lines = [
        f"### {name} (`{data['config']}`, {data['steps']} steps)",
        "",
        "| run | in flight | steps late, stage 0 → tail | "
        + " | ".join(f"step {s}" for s in marks)
        + " | worst gap from step 100 |",
        "|---|---|---|" + "---|" * len(marks) + "---|",
    ]
    for r in sorted(runs, key=lambda r: (r["name"] != "sync", r["window"] or 0, r["name"])):
        g = gaps(r, sync)
        cells = []
        for s in marks:
            h = dict(r["evals"]).get(s)
            cells.append(
                "-" if h is None else f"{h:.4f}" + ("" if r["name"] == "sync" else f" ({g[s]:+.1%})")
            )
        late = " / ".join(f"{d:.2f}" for d in r["delays"]) or "0 (flushes every step)"
        worst = max((v for s, v in g.items() if s >= 100), default=0.0)
        lines.append(
            f"| `{r['spec']}` | {r['window'] or '-'} | {late} | " + " | ".join(cells) + f" | {worst:+.1%} |"
        )
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    sets = [load(d) for d in a.dirs]
    md = ["# Async against sync at equal steps, one process (generated)", ""]
    for name, data, runs in sets:
        md += table(name, data, runs)
    (a.out / "results.md").write_text("\n".join(md))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.6), squeeze=False)
    for ax, (name, _, runs) in zip(axes[0], sets, strict=True):
        sync = dict(next(r for r in runs if r["name"] == "sync")["evals"])
        for r in runs:
            if r["name"] == "sync":
                continue
            g = gaps(r, sync)
            ax.plot(list(g), [100 * v for v in g.values()], label=r["name"], lw=1.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(1, color="k", lw=0.5, ls=":")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out vs sync (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "gap.png", dpi=110)


if __name__ == "__main__":
    main()
