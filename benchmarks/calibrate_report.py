"""The calibration's report: the fitted event-loop constant, predicted against measured tokens/s for every
local swarm, and the regime-matched runs, as JSON, markdown tables and PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pydantic import BaseModel

from benchmarks.calibrate import Measured
from benchmarks.calibration import Fitted, errors, predict
from pmnode.bench.plotting import pyplot

GRID = [round(0.001 + 0.000125 * i, 6) for i in range(25)]  # msg_cpu: 1 to 4 ms CPU per message end
LATE = [0.005, 0.01]  # seconds a shaped message is woken late
BYTES = [i * 1e-8 for i in range(13)]  # byte_cpu: 0 to 120 ns CPU per replica-sync byte


class Variant(BaseModel):
    fitted: Fitted
    median_error: float
    worst_error: float


class Row(BaseModel):
    name: str
    measured: float
    predicted: float
    error: float
    binding: str


def fit_all(runs: list[Measured]) -> list[Variant]:
    """The best constants for each model variant (event loop beside or sharing the compute thread; shaped
    messages woken on time or late): the smallest worst error, then the smallest median. The event-loop
    constants are fitted on the runs without replicas, then the cost per replica-sync byte on all runs
    (it moves only those with replicas)."""
    single = [m for m in runs if m.spec.replicas < 2 and m.spec.heads < 2] or runs
    out = []
    for shared in (False, True):
        for late in (False, True):
            best: Fitted | None = None
            key: tuple[float, float] | None = None
            for g in GRID:
                for lt in LATE if late else [0.0]:
                    f = Fitted(msg_cpu=g, shared=shared, late_s=lt)
                    e = [abs(x) for x in errors(single, f)]
                    k = (max(e), statistics.median(e))
                    if key is None or k < key:
                        best, key = f, k
            assert best is not None
            out.append(_fit_bytes(runs, best))
    return out


def _score(runs: list[Measured], f: Fitted) -> Variant:
    e = [abs(x) for x in errors(runs, f)]
    return Variant(fitted=f, median_error=statistics.median(e), worst_error=max(e))


def _fit_bytes(runs: list[Measured], f: Fitted) -> Variant:
    """The RPC stack's cost per replica-sync byte, given the variant's other constants."""
    best = _score(runs, f)
    if all(m.spec.replicas < 2 and m.spec.heads < 2 for m in runs):
        return best
    for b in BYTES[1:]:
        w = _score(runs, f.model_copy(update={"byte_cpu": b}))
        if (w.worst_error, w.median_error) < (best.worst_error, best.median_error):
            best = w
    return best


def rows(runs: list[Measured], v: Variant) -> list[Row]:
    out = []
    for m in runs:
        r = predict(m, v.fitted)
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
    v = min(variants, key=lambda x: (x.worst_error, x.median_error))
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

    def say(x: Variant) -> str:
        f = x.fitted
        return (
            f"event loop {'sharing' if f.shared else 'beside'} the compute thread, "
            f"{f.msg_cpu * 1e3:g} ms CPU per message end, shaped messages {f.late_s * 1e3:g} ms late, "
            f"{f.byte_cpu * 1e9:g} ns CPU per replica-sync byte: "
            f"median |error| {x.median_error:.1%}, worst {x.worst_error:.1%}"
        )

    lines = [
        f"Command: `{command}`",
        "",
        f"Chosen: {say(v)}.",
        "",
        "Other variants, each at its best constants:",
        "",
        *(f"- {say(x)}" for x in variants if x is not v),
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
    plt = pyplot()

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
