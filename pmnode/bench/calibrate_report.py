"""The calibration's report: the fitted event-loop constant, predicted against measured tokens/s for every
local swarm, and the regime-matched runs, as JSON, markdown tables and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.calibrate import Measured
from pmnode.sim.calibration import errors, predict

GRID = [round(0.0005 * i, 4) for i in range(1, 13)]  # msg_cpu, CPU seconds per message end


class Variant(BaseModel):
    shared: bool  # the event loop waits for the compute thread's turn (one interpreter lock)
    msg_cpu: float
    median_error: float
    worst_error: float


class Row(BaseModel):
    name: str
    measured: float
    predicted: float
    error: float
    binding: str


def fit_all(runs: list[Measured]) -> list[Variant]:
    out = []
    for shared in (False, True):
        best: Variant | None = None
        for g in GRID:
            e = [abs(x) for x in errors(runs, g, shared=shared)]
            v = Variant(shared=shared, msg_cpu=g, median_error=statistics.median(e), worst_error=max(e))
            if best is None or (v.median_error, v.worst_error) < (best.median_error, best.worst_error):
                best = v
        assert best is not None
        out.append(best)
    return out


def rows(runs: list[Measured], v: Variant) -> list[Row]:
    out = []
    for m in runs:
        r = predict(m, v.msg_cpu, shared=v.shared)
        out.append(
            Row(
                name=m.spec.name,
                measured=m.tokens_per_s,
                predicted=r.tokens_per_s,
                error=r.tokens_per_s / m.tokens_per_s - 1,
                binding=r.binding,
            )
        )
    return out


def _describe(m: Measured) -> str:
    s = m.spec
    link = "unlimited" if s.bandwidth == "unlimited" else s.bandwidth
    lat = "" if s.latency in ("0", "0ms") else f", {s.latency}"
    return (
        f"{s.config} | {s.stages}{f'x{s.replicas}' if s.replicas > 1 else ''} | {s.schedule} | {s.codec} "
        f"| {link}{lat} | {s.inflight}"
    )


def write_calibration(out: Path, runs: list[Measured], command: str) -> Variant:
    variants = fit_all(runs)
    v = min(variants, key=lambda x: (x.median_error, x.worst_error))
    table = rows(runs, v)
    (out / "calibration.json").write_text(
        json.dumps(
            {
                "command": command,
                "variants": [x.model_dump() for x in variants],
                "chosen": v.model_dump(),
                "rows": [r.model_dump() for r in table],
            },
            indent=1,
        )
    )
    lines = [
        f"Command: `{command}`",
        "",
        f"Fitted: {v.msg_cpu * 1e3:g} ms of CPU per message end, event loop "
        f"{'sharing' if v.shared else 'beside'} the compute thread; median |error| {v.median_error:.1%}, "
        f"worst {v.worst_error:.1%}. Other variant: "
        + "; ".join(
            f"{'shared' if x.shared else 'separate'} loop at {x.msg_cpu * 1e3:g} ms: "
            f"median {x.median_error:.1%}, worst {x.worst_error:.1%}"
            for x in variants
            if x is not v
        ),
        "",
        "| run | config | stages | schedule | codec | link | in flight | measured tok/s | simulated "
        "| error | binds (sim) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in zip(runs, table, strict=True):
        lines.append(
            f"| {r.name} | {_describe(m)} | {r.measured:,.0f} | {r.predicted:,.0f} | {r.error:+.1%} "
            f"| {r.binding} | {m.loadavg_1m:.1f} |"
        )
    (out / "calibration.md").write_text("\n".join(lines) + "\n")
    _plot(out / "calibration.png", table, "simulator against local swarms (2 shared CPU cores)")
    return v


def _plot(path: Path, table: list[Row], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    xs, ys = [r.measured for r in table], [r.predicted for r in table]
    lo, hi = min(xs + ys) * 0.7, max(xs + ys) * 1.4
    ax.plot([lo, hi], [lo, hi], color="black", lw=1)
    ax.fill_between(
        [lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.2, label="±15%"
    )
    ax.scatter(xs, ys, zorder=3)
    for r in table:
        ax.annotate(r.name, (r.measured, r.predicted), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured tokens/s")
    ax.set_ylabel("simulated tokens/s")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
