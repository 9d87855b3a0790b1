"""What replica sync costs in learning: `pmnode bench convergence --replicas R` runs against exact sums.

Every run in OUT/runs/ with replicas > 1 is set against the run of the same variant with its
replica_sync settings removed and one replica: the exact path, whose summed gradients are the single
pipeline on the combined batch. Token-matched, as the fidelity study: results.json, results.md, loss.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.fidelity import RunResult, load_runs, loss_at
from pmnode.bench.plotting import pyplot
from pmnode.bench.variants import parse_variant
from pmnode.config import ReplicaSyncConfig


class ScaleRow(BaseModel):
    variant: str
    label: str  # short, for the plot's legend
    replicas: int
    method: str
    compressor: str | None
    inner_steps: int | None
    tokens: int
    heldout_loss: float
    gap: float | None  # against exact sums at equal tokens
    bytes_per_round: int  # per replica, all stages of a lane (a swarm node holds one stage)
    fp16_ratio: float | None  # bytes per round over the fp16 parameters they stand for
    complete: bool


def sync_settings(variant: str) -> tuple[str, dict]:
    """The variant with its replica_sync overrides taken out, and those overrides."""
    codec, overrides = parse_variant(variant)
    sync = overrides.pop("replica_sync", {})
    rest = [p for p in variant.split("+")[1:] if not p.startswith("replica_sync.")]
    return "+".join([codec, *rest]), sync


def label(run: RunResult) -> str:
    _, sync = sync_settings(run.variant)
    cfg = ReplicaSyncConfig.model_validate(sync)  # the shipped configs set no replica_sync: its defaults
    if run.replicas == 1 or cfg.method == "step":
        return f"exact sums, R = {run.replicas}"
    extra = [f"{k.removeprefix('topk_')}={v}" for k, v in sync.items() if k.startswith(("topk_", "outer_"))]
    if "error_feedback" in sync:
        extra.append(f"ef={cfg.error_feedback:g}")
    if cfg.method == "grads":  # compressed gradient sums every step: no outer rounds, no H
        return " ".join([f"R={run.replicas} {cfg.compressor} grads", *extra])
    return " ".join([f"R={run.replicas} {cfg.compressor} H={cfg.inner_steps}", *extra])


def rows(runs: list[RunResult]) -> list[ScaleRow]:
    exact = {sync_settings(r.variant)[0]: r for r in runs if r.replicas == 1}
    out = []
    for r in runs:
        base_variant, sync = sync_settings(r.variant)
        cfg = ReplicaSyncConfig.model_validate(sync)
        outer = cfg.method == "outer"
        base = exact.get(base_variant)
        gap = None
        if base is not None and r is not base:
            ref = base.heldout_loss if base.tokens == r.tokens else loss_at(base.curve, r.tokens)
            gap = round(r.heldout_loss / ref - 1, 4) if ref else None
        sent = sum(r.sync_bytes_per_round)
        params = sum(r.sync_params_per_stage)
        out.append(
            ScaleRow(
                variant=r.variant,
                label=label(r),
                replicas=r.replicas,
                method=cfg.method,
                compressor=cfg.compressor if outer else None,
                inner_steps=cfg.inner_steps if outer else None,
                tokens=r.tokens,
                heldout_loss=r.heldout_loss,
                gap=gap,
                bytes_per_round=sent,
                fp16_ratio=round(sent / (2 * params), 5) if params and sent else None,
                complete=r.complete,
            )
        )
    return out


def _pct(x: float | None) -> str:
    return f"{100 * x:+.2f}%" if x is not None else "-"


def markdown(table: list[ScaleRow], runs: list[RunResult], title: str) -> str:
    lines = [
        f"# {title}: replica sync against exact sums",
        "",
        "Held-out loss at the end of each run; *gap* against the exact path (one replica on the whole "
        "batch, what R replicas summing their gradients every step compute) at equal tokens. *bytes per "
        "round*: what one replica sends per outer round for every stage of its lane; *of fp16*: that over "
        "the lane's trainable parameters at 2 bytes each.",
        "",
        "| run | variant | R | tokens | held-out | gap | bytes per round | of fp16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cut = "" if r.complete else " (cut short)"
        ratio = (
            "-"
            if not r.fp16_ratio
            else (f"{r.fp16_ratio:.1f}x" if r.fp16_ratio >= 1 else f"1/{1 / r.fp16_ratio:,.0f}")
        )
        lines.append(
            f"| {r.label}{cut} | `{r.variant}` | {r.replicas} | {r.tokens / 1e6:.2f}M | {r.heldout_loss:.4f} "
            f"| {_pct(r.gap)} | {r.bytes_per_round:,} | {ratio} |"
        )
    lines += ["", "Token-matched held-out loss (gap against exact sums in brackets):", ""]
    points = [
        p
        for p in (100_000, 200_000, 300_000, 500_000, 1_000_000, 2_000_000, 5_000_000)
        if any(r.tokens >= p for r in runs)
    ]
    lines += ["| run | " + " | ".join(f"{p / 1e6:g}M" for p in points) + " |", "|---|" + "---|" * len(points)]
    exact = {sync_settings(r.variant)[0]: r for r in runs if r.replicas == 1}
    for run, row in zip(runs, table, strict=True):
        base = exact.get(sync_settings(run.variant)[0])
        cells = []
        for p in points:
            mine = loss_at(run.curve, p)
            ref = loss_at(base.curve, p) if base is not None else None
            gap = f" ({_pct(mine / ref - 1)})" if mine is not None and ref and run is not base else ""
            cells.append(f"{mine:.4f}{gap}" if mine is not None else "")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "Commands:", "", *[f"    {c}" for c in sorted({r.command for r in runs})], ""]
    return "\n".join(lines)


def plot(runs: list[RunResult], table: list[ScaleRow], out: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for run, row in zip(runs, table, strict=True):
        xs = [t / 1e6 for _, t, _ in run.curve]
        ax.plot(xs, [loss for _, _, loss in run.curve], label=row.label, lw=2 if run.replicas == 1 else 1.2)
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{title}: replica sync vs exact sums")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


def has_replicas(out: Path) -> bool:
    return any(r.replicas > 1 for r in load_runs(out))


def write_report(out: Path, title: str) -> list[ScaleRow]:
    runs = sorted(load_runs(out), key=lambda r: (r.replicas, r.variant))  # exact sums first
    table = rows(runs)
    (out / "results.json").write_text(
        json.dumps(
            {"runs": [r.model_dump() for r in runs], "rows": [t.model_dump() for t in table]}, indent=1
        )
    )
    (out / "results.md").write_text(markdown(table, runs, title))
    plot(runs, table, out, title)
    return table
