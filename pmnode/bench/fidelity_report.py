"""The fidelity report: results.json, results.md and plots, rebuilt from every run in a directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pmnode.bench import fidelity_sweeps
from pmnode.bench.fidelity import Row, RunResult, compare, is_unconstrained, load_runs, loss_at
from pmnode.bench.labels import label, preset_of, setting_of
from pmnode.bench.plotting import pyplot
from pmnode.plan.advice import MeasuredCost


def _pct(x: float | None) -> str:
    return f"{100 * x:+.1f}%" if x is not None else "-"


def labels(runs: list[RunResult]) -> dict[str, str]:
    """Each run's short name for legends and tables ('int8 k=d/8, remedy'); the full variant string
    stays in the tables. Widths are named when a directory mixes them; repeats get a number."""
    widths = len({r.d_model for r in runs}) > 1
    out: dict[str, str] = {}
    for r in runs:
        name = label(r.variant, r.codec, r.rank, r.d_model, preset_of(r.variant, r.preset))
        name = f"d={r.d_model} {name}" if widths else name
        n = sum(1 for v in out.values() if v == name or v.startswith(f"{name} #"))
        out[r.variant] = f"{name} #{n + 1}" if n else name
    return out


def markdown(rows: list[Row], runs: list[RunResult], target: float | None, title: str) -> str:
    commands = sorted({r.command for r in runs})
    lines = [
        f"# {title}",
        "",
        "Held-out loss (nats per byte token) at the end of each run and at half its tokens. *gap* is "
        "against the **unconstrained model of the same architecture** (the same variant with k = d and "
        "nothing projected: frozen token table F, branch norm, full-rank writes, and the variant's own "
        "extra parts such as stage embeddings), at equal tokens: the cost of the compression alone. "
        "*vs plain* is against the plain unconstrained model of the same shape (k = d, no extra parts): "
        "what a user gives up against training the usual model. *vs dense* is against the **plain "
        "dense** model (no F, no branch norm). *steps ratio*: steps to reach "
        + (f"held-out {target}" if target is not None else "the unconstrained model's final held-out loss")
        + " over the unconstrained model's steps to the same loss (ProtocolNanoGPT's measure); "
        "'not reached' means the run ended above it.",
        "",
        "| variant (legend label) | d | k | constrain | boundaries | B/token | tokens | held-out | gap "
        "| gap at mid | vs plain | vs dense | steps to target | steps ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    complete = {run.variant: run.complete for run in runs}
    names = labels(runs)
    for r in rows:
        steps = f"{r.steps_to_target:,.0f}" if r.steps_to_target is not None else "not reached"
        cut = "" if complete[r.variant] else " **(cut short: still running or stopped)**"
        lines.append(
            f"| `{r.variant}` ({names[r.variant]}){cut} | {r.d_model} | {r.rank or '-'} "
            f"| {r.constrain or '-'} | {r.boundaries} | {r.bytes_per_token} | {r.tokens / 1e6:.2f}M "
            f"| {r.heldout_loss:.4f} "
            f"| {_pct(r.gap_end)} | {_pct(r.gap_mid)} | {_pct(r.gap_plain)} | {_pct(r.gap_dense)} | {steps} "
            f"| {r.steps_ratio if r.steps_ratio is not None else '-'} |"
        )
    lines += ["", *token_matched(rows, runs)]
    lines += ["", *fidelity_sweeps.markdown(fidelity_sweeps.points(rows, runs))]
    lines += ["", "Diagnostics at the end of each run (held-out batches; pmnode/bench/diagnostics.py):", ""]
    lines += [
        "| variant | dims for 90% of the stream, per layer | kept by a boundary (in span U) "
        "| write stable rank (attn, mlp) | grad norm per layer |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        dg = run.diagnostics
        if dg is None:
            continue
        spans = [f"{x.in_span:.2f}" for x in dg.layers if x.in_span is not None]
        lines.append(
            f"| `{run.variant}` | {' '.join(str(x.dims90) for x in dg.layers)} "
            f"| {' '.join(spans) or '-'} "
            f"| {' '.join('/'.join(f'{v:.0f}' for v in x.write_stable_rank) for x in dg.layers)} "
            f"| {' '.join(f'{x.grad_norm:.3f}' for x in dg.layers)} |"
        )
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands], ""]
    return "\n".join(lines)


MARKS = (500_000, 1_000_000, 2_000_000, 3_000_000, 5_000_000)


def token_matched(rows: list[Row], runs: list[RunResult]) -> list[str]:
    """Held-out loss at fixed token counts, and the gap against each run's baseline there."""
    by_name = {r.variant: r for r in runs}
    lines = [
        "Token-matched: held-out loss at each token count (interpolated between evaluations), and in "
        "brackets the gap against the run's baseline at the same tokens (blank past a run's end).",
        "",
        "| variant | " + " | ".join(f"{m / 1e6:g}M" for m in MARKS) + " |",
        "|---|" + "---|" * len(MARKS),
    ]
    for row in rows:
        run, base = by_name[row.variant], by_name.get(row.baseline or "")
        cells = []
        for mark in MARKS:
            mine = loss_at([(0, 0, math.inf), *run.curve], mark) if run.curve else None
            theirs = loss_at(base.curve, mark) if base is not None else None
            if mine is None or math.isinf(mine):
                cells.append("")
            elif theirs is None or base is run:
                cells.append(f"{mine:.4f}")
            else:
                cells.append(f"{mine:.4f} ({100 * (mine / theirs - 1):+.1f}%)")
        lines.append(f"| `{row.variant}` | " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[RunResult], out: Path, title: str) -> None:
    plt = pyplot()

    widths = sorted({r.d_model for r in runs})
    names = labels(runs)
    fig, axes = plt.subplots(1, len(widths), figsize=(9.5 * len(widths), 4.8), squeeze=False)
    for ax, d in zip(axes[0], widths, strict=True):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 runs without a repeated colour
        for r in sorted((r for r in runs if r.d_model == d), key=lambda r: r.variant):
            toks = [t / 1e6 for _, t, _ in r.curve]
            ax.plot(toks, [loss for _, _, loss in r.curve], marker=".", ms=3, label=names[r.variant])
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"{title}, d = {d}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the axes
        lows = [min(loss for _, _, loss in r.curve) for r in runs if r.d_model == d and r.curve]
        if lows:
            ax.set_ylim(min(lows) * 0.97, min(lows) * 1.6)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def plot_gaps(rows: list[Row], runs: list[RunResult], out: Path, title: str) -> None:
    """The gap against each run's baseline as the tokens grow: whether it closes or keeps opening."""
    plt = pyplot()

    by_name = {r.variant: r for r in runs}
    names = labels(runs)
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for row in rows:
        run, base = by_name[row.variant], by_name.get(row.baseline or "")
        if base is None or base is run:
            continue
        pts = [(t, loss / ref - 1) for _, t, loss in run.curve if (ref := loss_at(base.curve, t))]
        if pts:
            xs, ys = [t / 1e6 for t, _ in pts], [100 * g for _, g in pts]
            ax.plot(xs, ys, marker=".", ms=3, label=names[row.variant])
    ax.axhline(2, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out loss over the unconstrained model's (%)")
    ax.set_title(f"{title}: the cost of compression, token-matched")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(out / "gap.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, target: float | None, title: str) -> list[Row]:
    runs = load_runs(out)
    rows = compare(runs, target)
    sweeps = fidelity_sweeps.points(rows, runs)
    (out / "results.json").write_text(
        json.dumps(
            {
                "target": target,
                "rows": [r.model_dump() for r in rows],
                "sweeps": [p.model_dump() for p in sweeps],
                "runs": [r.model_dump() for r in runs],
            },
            indent=1,
        )
    )
    (out / "results.md").write_text(markdown(rows, runs, target, title))
    if runs:
        plot(runs, out, title)
        plot_gaps(rows, runs, out, title)
        fidelity_sweeps.plot(sweeps, out, title)
    return rows


def costs_from_runs(out: Path, corpus: str) -> list[MeasuredCost]:
    """The compressed runs of a `bench convergence --tokens` directory, as shipped costs."""
    runs = {r.variant: r for r in load_runs(out)}
    costs = []
    for row in compare(list(runs.values()), None):
        run = runs[row.variant]
        if row.rank is None or is_unconstrained(run) or (row.gap_end is None and row.gap_plain is None):
            continue
        costs.append(
            MeasuredCost(
                d_over_k=round(row.d_model / row.rank, 2),
                d_model=row.d_model,
                rank=row.rank,
                variant=row.variant,
                codec=run.codec,
                setting=setting_of(row.variant, preset_of(run.variant, run.preset)),
                corpus=corpus,
                tokens=row.tokens,
                complete=run.complete,
                gap=row.gap_end,
                gap_plain=row.gap_plain,
                steps_ratio=row.steps_ratio,
            )
        )
    return costs
