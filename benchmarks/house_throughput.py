r"""Local-swarm tokens/s of two installs of pmnode, interleaved: a refactor's before and after.

    python -m benchmarks.house_throughput --before /tmp/vb/bin/pmnode --after /tmp/va/bin/pmnode \
        --rounds 3 --out docs/benchmarks/house

Each round runs, for every config and schedule, the `before` install then the `after` one (the order
flips every round, so a load that drifts during a round falls on both sides alike): `pmnode
local-swarm --config C --stages S --steps N --schedule X --summary-json ...`. Tokens/s and held-out
loss come from the swarm's summary; the machine's load average is read before every run. The configs
are this checkout's files, passed to both installs, so both train the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.plotting import pyplot


class Run(BaseModel):
    side: str
    config: str
    schedule: str
    round: int
    tokens_per_s: float
    heldout_loss: float
    load: float  # 1-minute load average when the run started
    wall_s: float


class Summary(BaseModel):
    """What the swarm's --summary-json holds that this benchmark reads."""

    tokens_per_s: float
    heldout_loss: float


def one(pmnode: str, config: str, stages: int, steps: int, schedule: str) -> tuple[Summary, float]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "summary.json"
        args = [pmnode, "local-swarm", "--config", config, "--stages", str(stages), "--steps", str(steps)]
        args += ["--schedule", schedule, "--workdir", str(Path(d) / "work"), "--summary-json", str(out)]
        t0 = time.monotonic()
        r = subprocess.run(args, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
        return Summary.model_validate_json(out.read_text()), time.monotonic() - t0


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| config | schedule | before tok/s (each round) | after tok/s (each round) | after / before (means) "
        "| held-out before / after | load |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r.config, r.schedule) for r in runs})
    for config, schedule in keys:
        side = {
            s: [r for r in runs if (r.config, r.schedule, r.side) == (config, schedule, s)] for s in SIDES
        }
        b, a = ([r.tokens_per_s for r in side[s]] for s in SIDES)
        loads = [r.load for r in runs if (r.config, r.schedule) == (config, schedule)]
        lines.append(
            f"| {config} | {schedule} | {_each(b)} | {_each(a)} "
            f"| {statistics.mean(a) / statistics.mean(b):.3f} "
            f"| {side['before'][-1].heldout_loss:.4f} / {side['after'][-1].heldout_loss:.4f} "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    return lines


def _each(xs: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in xs)


def plot(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    keys = sorted({(r.config, r.schedule) for r in runs})
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, key in enumerate(keys):
        for j, s in enumerate(SIDES):
            ys = [r.tokens_per_s for r in runs if (r.config, r.schedule, r.side) == (*key, s)]
            ax.scatter([i + (j - 0.5) * 0.3] * len(ys), ys, color=f"C{j}", label=s if i == 0 else None)
    ax.set_xticks(range(len(keys)), [f"{Path(c).stem}\n{s}" for c, s in keys])
    ax.set_ylabel("tokens/s (local swarm)")
    ax.set_title("before and after, interleaved rounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SIDES = ("before", "after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the `pmnode` executable of the before install")
    ap.add_argument("--after", required=True, help="the `pmnode` executable of the after install")
    ap.add_argument(
        "--configs", default="configs/tiny.yaml:3:300,configs/small.yaml:2:60", help="PATH:STAGES:STEPS,..."
    )
    ap.add_argument("--schedules", default="sync,async")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/house"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / "throughput.json"
    runs = [Run.model_validate(r) for r in json.loads(raw.read_text())] if raw.exists() else []
    bins = {"before": a.before, "after": a.after}
    for rnd in range(a.rounds):
        order = SIDES if rnd % 2 == 0 else SIDES[::-1]
        for spec in a.configs.split(","):
            config, stages, steps = spec.split(":")
            for schedule in a.schedules.split(","):
                for side in order:
                    load = os.getloadavg()[0]
                    s, wall = one(bins[side], config, int(stages), int(steps), schedule)
                    runs.append(
                        Run(side=side, config=config, schedule=schedule, round=rnd, load=load, wall_s=wall,
                            tokens_per_s=s.tokens_per_s, heldout_loss=s.heldout_loss)
                    )  # fmt: skip
                    tps = f"{s.tokens_per_s:,.0f} tok/s"
                    print(f"round {rnd} {config} {schedule} {side}: {tps} (load {load:.1f})")
                    raw.write_text(json.dumps([r.model_dump() for r in runs], indent=1))
    (a.out / "throughput.md").write_text("\n".join(table(runs)) + "\n")
    plot(runs, a.out / "throughput.png")
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
