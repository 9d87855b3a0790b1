r"""Spot checks of compute (issue 25, item 5): how soon a lying replica is banned, and what checks cost.

    python -m benchmarks.spot_check_bench simulate --out docs/benchmarks/trust
    nice python -m benchmarks.spot_check_bench real --out docs/benchmarks/trust
    python -m benchmarks.spot_check_bench report --out docs/benchmarks/trust

simulate  the policy itself (pmnode.swarm.spot_policy: Sampler, Liar, distance, decide), seeded: a stage
          of R replicas, one lying on a fraction p of the outputs it computes; every micro-batch goes to
          a replica at random (equal replicas are chosen at random among near-equals); a checked one asks
          the server (A) for what it sent, a random other replica (B) to compute it, and on a mismatch the
          third (C). Counted: the micro-batches the liar served until its ban, over many trials.
real      `pmnode local-swarm` of 3 stages x 3 replicas of tiny (sync): one run per lie rate with one
          stage-1 replica lying (PMNODE_TEST_LIE), the micro-batches it served until the ban read from its
          summary (samples_served / micro; none after the ban); and runs without a liar at check rates
          0, 0.05 and 1, alternated, for the head's tokens/s.
report    results.json -> results.md (tables) and spot_checks.png; README.md is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.launch import HeadSpotChecks, ReplicaSpotChecks, local_swarm, node_summaries
from pmnode.bench.plotting import pyplot
from pmnode.core.codecs import Int8Q, Packet
from pmnode.swarm.spot_policy import Sampler, decide, distance
from pmnode.swarm.spot_serve import Liar

ROOT = Path(__file__).resolve().parent.parent
RATE, TOL, GOAL = 0.05, 0.05, 200


def _honest() -> Packet:
    g = torch.Generator().manual_seed(0)
    t = Int8Q(8).pack(torch.randn(1, 4, 8, generator=g))
    t["tokens"] = torch.zeros(1, 4, dtype=torch.uint8)
    return Packet(t)


def trial(p: float, rate: float, replicas: int, seed: int, cap: int) -> int | None:
    """Micro-batches the liar served until its ban (None: not banned within `cap` of them)."""
    rng, honest = random.Random(seed), _honest()
    sampler, liar = Sampler(rate, random.Random(seed + 1)), Liar(p, seed + 2)
    peers = [f"r{i}" for i in range(replicas)]  # r0 lies

    def output(peer: str) -> Packet:
        return liar(honest) if peer == "r0" else honest

    served = 0
    while served < cap:
        a = rng.choice(peers)
        served += a == "r0"
        sent = output(a)  # the lie happens when the output is sent, checked or not
        if not sampler.pick():
            continue
        others = [q for q in peers if q != a]
        b = rng.choice(others)
        again = output(b)
        if distance(sent, again) <= TOL:
            continue
        rest = [q for q in others if q != b]
        if not rest:
            continue  # undecided: the step goes again, nobody is banned
        third = output(rest[0])
        v = decide(a, b, False, rest[0], distance(sent, third) <= TOL, distance(again, third) <= TOL)
        if v.liar == "r0":
            return served
    return None


def simulate(out: Path, trials: int) -> dict:
    rows = []
    for p in (0.01, 0.1, 1.0):
        for replicas in (3, 2):
            n = trials if p > 0.01 else max(trials // 4, 100)
            cap = 20 * int(1 / (RATE * p))
            if replicas == 2:  # no third opinion: never banned by design; a short run shows it
                n, cap = 50, 2 * int(1 / (RATE * p))
            got = [trial(p, RATE, replicas, 1000 * i, cap) for i in range(n)]
            caught = sorted(x for x in got if x is not None)
            row = {"lie_rate": p, "check_rate": RATE, "replicas": replicas, "trials": n, "cap": cap}
            row["banned"] = len(caught) / n
            if caught:
                q = statistics.quantiles(caught, n=10) if len(caught) > 1 else [caught[0]] * 9
                row.update(
                    mean=statistics.fmean(caught),
                    median=statistics.median(caught),
                    p90=q[8],
                    within_goal=sum(x <= GOAL for x in got if x is not None) / n,
                    expected_mean=1 / (2 * RATE * p),  # caught as A (rate p) or as B (rate p): 2 rate p
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {
        "simulated": rows,
        "command": "python -m benchmarks.spot_check_bench simulate --trials " + str(trials),
    }


def tolerance() -> dict:
    """The distance between two honest replicas, one under bf16 autocast: what the tolerance must allow."""
    from pmnode.config import load_config
    from pmnode.core.worker import StageWorker

    torch.manual_seed(0)
    rows = []
    for name in ("tiny", "small"):
        cfg = load_config(name).with_overrides(n_stages=3)
        head = StageWorker(cfg, 0, codec=cfg.codec_spec)
        fp32 = StageWorker(cfg, 1, codec=cfg.codec_spec)
        bf16 = StageWorker(cfg, 1, codec=cfg.codec_spec, autocast_bf16=True)
        with torch.no_grad():  # weights away from their init, the same on both
            for p in fp32.stage.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        bf16.stage.load_state_dict(fp32.stage.state_dict())
        d = []
        for _ in range(20):
            x = head.evaluate(
                None, torch.randint(0, cfg.model.vocab_size, (cfg.train.micro, cfg.train.seq_len))
            )
            d.append(distance(fp32.evaluate(x), bf16.evaluate(x)))
        rows.append({"config": name, "fp32_vs_bf16_max": max(d), "fp32_vs_bf16_mean": statistics.fmean(d)})
        print(json.dumps(rows[-1]), flush=True)
    return {"tolerance": rows, "tolerance_command": "python -m benchmarks.spot_check_bench tolerance"}


# ---- real runs ------------------------------------------------------------------------------------------
def _config(tmp: Path, steps: int, rate: float) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["n_stages"] = 3
    cfg["train"].update(steps=steps, eval_every=steps)
    cfg["trust"] = {"spot_check_rate": rate}
    path = tmp / f"tiny-{rate}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def swarm(tmp: Path, steps: int, rate: float, lie: float | None, seed: int = 0) -> dict:
    work = tmp / f"work-{rate}-{lie}-{seed}-{time.monotonic_ns()}"
    env = dict(os.environ)
    if lie is not None:
        env.update(PMNODE_TEST_LIE=str(lie), PMNODE_TEST_LIE_SEED=str(seed), PMNODE_TEST_LIE_NODE="node-1-2")
    args = ["--config", str(_config(tmp, steps, rate)), "--stages", "3", "--replicas", "3"]
    args += ["--schedule", "sync"]
    t0 = time.monotonic()
    local_swarm(args, work, env=env)
    nodes = node_summaries(work)
    head = nodes["node-0"]
    assert head.spot_checks is not None and head.tokens_per_s is not None
    spot = HeadSpotChecks.model_validate(head.spot_checks)
    out: dict[str, Any] = {
        "steps": steps,
        "check_rate": rate,
        "lie_rate": lie,
        "seed": seed,
        "wall_s": time.monotonic() - t0,
    }
    out.update(tokens_per_s=head.tokens_per_s, spot=head.spot_checks)
    # CPU, not wall time: the machine is shared, so tokens/s moves by tens of percent between runs
    out["process_cpu_s"] = sum(n.process_cpu_s for n in nodes.values())
    out["compute_cpu_s"] = sum(n.compute.cpu_s for n in nodes.values())
    out["tokens"] = steps * 8 * 64  # tiny: batch 8 x 64 tokens a step
    out["stage1_forwards"] = {k: n.compute.forwards for k, n in nodes.items() if n.stage == 1}
    if lie is not None:
        liar = nodes["node-1-2"]
        out["liar"] = liar.spot_checks
        liar_id = ReplicaSpotChecks.model_validate(liar.spot_checks).peer_id
        # counted by the head (who served each micro-batch): the liar's own counters restart when it
        # copies a replica's state to catch up after the ban
        out["liar_served_until_ban"] = spot.served_until_ban.get(liar_id)
        out["banned"] = liar_id in spot.banned
    print(json.dumps({k: v for k, v in out.items() if k != "spot"}), flush=True)
    return out


def real(out: Path, steps: int, cost_steps: int, repeats: int, only: str | None) -> dict:
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if only in (None, "detection"):
            res["real_detection"] = [swarm(tmp, steps, RATE, lie, seed) for lie, seed in ((1.0, 1), (0.1, 2))]
            res["real_command"] = (
                f"nice python -m benchmarks.spot_check_bench real --only detection --steps {steps}"
            )
        if only in (None, "cost"):
            rates = (0.0, RATE, 1.0)
            res["real_cost"] = [swarm(tmp, cost_steps, r, None) for _ in range(repeats) for r in rates]
            cmd = f"nice python -m benchmarks.spot_check_bench real --only cost --cost-steps {cost_steps} "
            res["cost_command"] = cmd + f"--repeats {repeats}"
    return res


# ---- report ---------------------------------------------------------------------------------------------
def report(out: Path) -> None:
    res = json.loads((out / "results.json").read_text())
    lines = [
        "# Spot checks of compute",
        "",
        "Written by `benchmarks/spot_check_bench.py` (see its docstring).",
        "",
    ]
    lines += ["## Detection: micro-batches a liar served until its ban (check rate 5%)", ""]
    lines += ["Seeded simulation of the policy (`" + res.get("command", "") + "`):", ""]
    lines += [
        "| lie rate | replicas | trials | banned | mean | median | p90 | banned within 200 | 1/(2·rate·p) |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("simulated", []):
        if "mean" in r:
            lines.append(
                f"| {r['lie_rate']:.0%} | {r['replicas']} | {r['trials']} | {r['banned']:.1%} "
                f"| {r['mean']:.0f} | {r['median']:.0f} | {r['p90']:.0f} | {r['within_goal']:.1%} "
                f"| {r['expected_mean']:.0f} |"
            )
        else:
            lines.append(f"| {r['lie_rate']:.0%} | {r['replicas']} | {r['trials']} | 0 | - | - | - | 0 | - |")
    if "tolerance" in res:
        lines += [
            "",
            "Two honest replicas, one under bf16 autocast (`" + res["tolerance_command"] + "`):",
            "",
        ]
        lines += ["| config | relative L2, max of 20 | mean | tolerance | a lie (sign flip) |"]
        lines += ["|---|---|---|---|---|"]
        for r in res["tolerance"]:
            lines.append(
                f"| {r['config']} | {r['fp32_vs_bf16_max']:.4f} | {r['fp32_vs_bf16_mean']:.4f} "
                f"| {TOL} | 2.0 |"
            )
    if "real_detection" in res:
        lines += ["", "Real runs (`" + res["real_command"] + "`):", ""]
        lines += ["| lie rate | steps | banned | liar's micro-batches until the ban | lies told | checks |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in res["real_detection"]:
            c = r["spot"]["counts"]
            lines.append(
                f"| {r['lie_rate']:.0%} | {r['steps']} | {r['banned']} | {r['liar_served_until_ban']} "
                f"| {r['liar']['lies']} | {sum(v for k, v in c.items() if k != 'banned')} |"
            )
        lines += ["", f"## Cost: the head's tokens/s without a liar (`{res.get('cost_command', '')}`)", ""]
        lines += [
            "| check rate | runs | checks | tokens/s: median (each) | against 0 "
            "| CPU s / 1k tokens, all nodes: processes | against 0 | compute threads | against 0 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by: dict[float, list[dict]] = {}
        for r in res["real_cost"]:
            by.setdefault(r["check_rate"], []).append(r)

        def med(rate: float, key: str) -> float:
            runs = [r for r in by.get(rate, []) if r.get(key)]
            per = [1000 * r[key] / r["tokens"] if key != "tokens_per_s" else r[key] for r in runs]
            return statistics.median(per) if per else float("nan")

        for rate, runs in sorted(by.items()):
            tps, cpu, comp = med(rate, "tokens_per_s"), med(rate, "process_cpu_s"), med(rate, "compute_cpu_s")
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            checks = statistics.median([sum(r["spot"]["counts"].values()) for r in runs])
            vs = tps / med(0.0, "tokens_per_s") - 1
            lines.append(
                f"| {rate:g} | {len(runs)} | {checks:.0f} | {tps:.0f} ({each}) | {vs:+.1%} "
                f"| {cpu:.3f} | {cpu / med(0.0, 'process_cpu_s') - 1:+.1%} "
                f"| {comp:.3f} | {comp / med(0.0, 'compute_cpu_s') - 1:+.1%} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(res, out / "spot_checks.png")


def _plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in res.get("simulated", []):
        if r["replicas"] == 3 and "mean" in r:
            ax[0].bar(f"{r['lie_rate']:.0%}", r["median"], color="tab:blue")
            ax[0].errorbar(
                f"{r['lie_rate']:.0%}", r["median"], yerr=[[0], [r["p90"] - r["median"]]], color="k"
            )
    ax[0].axhline(GOAL, color="tab:red", ls="--", label="goal for 10%: 200")
    ax[0].set(yscale="log", xlabel="lie rate", ylabel="liar's micro-batches until ban (median, to p90)")
    ax[0].set_title("detection at a 5% check rate, 3 replicas")
    ax[0].legend()
    by: dict[float, list[float]] = {}
    for r in res.get("real_cost", []):
        if r.get("process_cpu_s"):
            by.setdefault(r["check_rate"], []).append(1000 * r["process_cpu_s"] / r["tokens"])
    if by:
        rates = sorted(by)
        ax[1].boxplot([by[x] for x in rates], tick_labels=[f"{x:g}" for x in rates])
        ax[1].set(
            xlabel="check rate",
            ylabel="CPU s / 1k tokens, all nodes",
            title="cost (tiny, 7 processes, 2 shared cores)",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["simulate", "tolerance", "real", "report"])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "trust")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cost-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=["detection", "cost"], default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if a.mode == "simulate":
        res.update(simulate(a.out, a.trials))
    elif a.mode == "tolerance":
        res.update(tolerance())
    elif a.mode == "real":
        res.update(real(a.out, a.steps, a.cost_steps, a.repeats, a.only))
    if a.mode != "report":
        path.write_text(json.dumps(res, indent=1) + "\n")
    report(a.out)


if __name__ == "__main__":
    main()
