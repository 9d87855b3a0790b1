r"""Churn: a swarm trains while replicas leave (SIGKILL or SIGINT) and join, every 30-60 s.

    python -m benchmarks.churn --config configs/tiny.yaml --stages 3 --duration 600 \
        --out docs/benchmarks/churn
    python -m benchmarks.churn --schedule async --duration 600 --out docs/benchmarks/churn-async

Starts a coordinator, one head and two replicas of every later stage as real processes on
127.0.0.1, then alternates a leave (a random replica of a stage that has two or more, by SIGKILL
or by SIGINT in turn) and a join (a new `pmnode join` on a stage with the fewest replicas, which
catches up from a live replica: at its first commit under sync, before it serves under async, where
replicas then average parameters with hivemind). The head is never removed: it owns the data.

Measured: tokens/s of the head over 10 s windows, the events, and per node the samples applied
and `samples_off`, the summed |samples applied - batch size| over its steps (0 when no micro-batch
was lost or counted twice). Writes results.json, results.md and throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.launch import Processes
from pmnode.bench.plotting import pyplot
from pmnode.bench.swarm import head_lines
from pmnode.swarm.report import StepLine


def windows(points: list[StepLine], width: float) -> list[tuple[float, float]]:
    """(window end in seconds since training began, tokens/s in that window)."""
    res, start = [], 0
    for i, p in enumerate(points):
        q = points[start]
        if p.elapsed - q.elapsed >= width:
            res.append((p.elapsed, (p.tokens - q.tokens) / (p.elapsed - q.elapsed)))
            start = i
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--duration", type=float, default=600.0, help="Seconds of churn after the swarm is up.")
    ap.add_argument("--min-gap", type=float, default=30.0)
    ap.add_argument("--max-gap", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", choices=["sync", "async"], default="sync")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/churn"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw["n_stages"] = args.stages
    raw.setdefault("train", {}).update(steps=10**7, eval_every=10**7)
    raw.setdefault("swarm", {}).update(schedule=args.schedule, request_timeout=30.0)
    batch = raw["train"]["batch_size"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cfg = work / "config.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        swarm = Processes(work, env={"PMNODE_JOIN_TOKEN": os.urandom(16).hex()}, grace=30.0)
        count = 0

        def node(stage: int) -> str:
            nonlocal count
            name = f"node-{stage}-{count}"
            count += 1
            swarm.join(name, info, stage, ("--log-format", "json"))
            return name

        events: list[dict] = []
        with swarm:
            info = swarm.coordinator(cfg, work / "coord")
            for stage in reversed(range(1, args.stages)):
                node(stage)
                node(stage)
            head = node(0)
            head_log = work / f"{head}.log"
            while not head_lines(head_log):
                time.sleep(0.5)
            t0 = time.monotonic()
            leave_sig = [signal.SIGKILL, signal.SIGINT]
            turn = 0
            while time.monotonic() - t0 < args.duration:
                time.sleep(
                    min(
                        rng.uniform(args.min_gap, args.max_gap),
                        max(0.0, args.duration - (time.monotonic() - t0)),
                    )
                )
                if time.monotonic() - t0 >= args.duration:
                    break
                at = head_lines(head_log)[-1].elapsed
                if turn % 2 == 0:
                    stages = [s for s in range(1, args.stages) if len(swarm.live(s)) >= 2]
                    stage = rng.choice(stages)
                    victim = rng.choice(swarm.live(stage))
                    sig = leave_sig[(turn // 2) % 2]
                    victim.signal(sig)
                    events.append(
                        {
                            "t": at,
                            "kind": f"leave ({signal.Signals(sig).name})",
                            "stage": stage,
                            "node": victim.name,
                        }
                    )
                else:
                    stage = min(range(1, args.stages), key=lambda s: (len(swarm.live(s)), rng.random()))
                    name = node(stage)
                    events.append({"t": at, "kind": "join", "stage": stage, "node": name})
                print(json.dumps(events[-1]), flush=True)
                turn += 1
        points = head_lines(head_log)
        nodes: dict[str, dict] = {}
        for proc in swarm.procs:
            if proc.stage is None:
                continue  # the coordinator
            s = swarm.summary(proc.name)
            if s is not None:
                nodes[proc.name] = {
                    "stage": proc.stage,
                    "steps": s.steps,
                    "samples_applied": s.samples_applied,
                    "samples_off": s.samples_off,
                    "reissued": s.reissued,
                    "averaging_rounds": s.averaging.rounds,
                }
            else:
                nodes[proc.name] = {
                    "stage": proc.stage,
                    "summary": "none (SIGKILLed, or stopped while starting)",
                }
        caught = {
            proc.name: [
                line
                for line in proc.log.read_text().splitlines()
                if "caught up to step" in line or "copied replica" in line
            ]
            for proc in swarm.procs
            if proc.name.startswith("node-")
        }
    result = {
        "command": "python " + " ".join(sys.argv),
        "config": args.config,
        "schedule": args.schedule,
        "stages": args.stages,
        "duration_s": args.duration,
        "steps": points[-1].step if points else 0,
        "tokens": points[-1].tokens if points else 0,
        "tokens_per_s_overall": round(points[-1].tokens / points[-1].elapsed, 1) if points else 0,
        "events": events,
        "throughput": [[round(t, 1), round(r, 1)] for t, r in windows(points, 10.0)],
        "nodes": nodes,
        "catch_ups": {k: len(v) for k, v in caught.items() if v},
        "lost_or_double_samples": sum(n.get("samples_off") or 0 for n in nodes.values()),
        "micro_batches_reissued": nodes.get(head, {}).get("reissued", 0),
        "batch_size": batch,
    }
    write(args.out, result)


def write(out: Path, r: dict) -> None:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    lines = [
        f"# Churn: {r['config']}, {r['stages']} stages, {r.get('schedule', 'sync')}, {r['duration_s']:.0f} s",
        "",
        f"Command: `{r['command']}`",
        "",
        f"- steps {r['steps']}, {r['tokens_per_s_overall']:,.0f} tokens/s overall",
        f"- events: {len(r['events'])}; micro-batches sent again by the head: {r['micro_batches_reissued']}",
        f"- samples lost or counted twice, summed over every node's steps: **{r['lost_or_double_samples']}**",
        "",
        "| t (s) | event | stage | node |",
        "|---|---|---|---|",
        *(f"| {e['t']:.0f} | {e['kind']} | {e['stage']} | {e['node']} |" for e in r["events"]),
        "",
        "| node | stage | steps | samples applied | samples off | averaging rounds |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {v['stage']} | {v.get('steps', '-')} | {v.get('samples_applied', '-')} | "
            f"{v.get('samples_off', v.get('summary', '-'))} | {v.get('averaging_rounds', '-')} |"
            for n, v in sorted(r["nodes"].items())
        ),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if r["throughput"]:
        ax.plot(
            [t for t, _ in r["throughput"]],
            [v for _, v in r["throughput"]],
            marker=".",
            label="head tokens/s (10 s windows)",
        )
    for e in r["events"]:
        color = "tab:green" if e["kind"] == "join" else "tab:red"
        ax.axvline(e["t"], color=color, alpha=0.5, linestyle="--")
    ax.set_xlabel("seconds of training (red: a replica leaves, green: one joins)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"churn: {Path(r['config']).stem}, {r['stages']} stages, {r.get('schedule', 'sync')}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
