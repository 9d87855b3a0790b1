"""The issue's sweeps, read off a fidelity runs directory: the gap as a function of k (and of the
coefficients' precision, at equal bytes) and of the number of boundaries, in the middle and at the
end of the run.

Only runs of the plain architecture enter a sweep (no stage embeddings or other extra parts, no
optimiser change), so each row differs from its neighbours in one compression setting alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.fidelity import Row, RunResult, architecture, loss_at, steps_to
from pmnode.bench.labels import preset_of
from pmnode.bench.plotting import pyplot

MID, END = 2_500_000, 5_000_000
MARKS = (1_000_000, MID, END)


class SweepPoint(BaseModel):
    variant: str
    d_model: int
    rank: int
    precision: str  # fp32, bf16, int8, int4
    constrain: str
    boundaries: int
    bytes_per_token: int
    tokens: int  # how far the run got
    gaps: dict[int, float | None]  # tokens -> gap against the unconstrained model at equal tokens
    steps_ratio: float | None


def precision(codec: str) -> str:
    _, _, p = codec.partition(":")
    return p or "fp32"


def is_plain(variant: str) -> bool:
    return architecture(variant) == architecture(variant, plain=True) and "write_lr_scale" not in variant


def points(rows: list[Row], runs: list[RunResult]) -> list[SweepPoint]:
    by_name = {r.variant: r for r in runs}
    out = []
    for row in rows:
        run, base = by_name[row.variant], by_name.get(row.baseline or "")
        if base is None or row.rank is None or row.rank >= row.d_model or not is_plain(row.variant):
            continue
        if preset_of(run.variant, run.preset) != "paper":  # the remedy's tables are extra parts
            continue
        gaps: dict[int, float | None] = {}
        for t in MARKS:
            mine, ref = loss_at(run.curve, t), loss_at(base.curve, t)
            gaps[t] = round(mine / ref - 1, 4) if mine is not None and ref else None
        target = base.heldout_loss
        mine_steps, base_steps = steps_to(run.curve, target), steps_to(base.curve, target)
        ratio = round(mine_steps / base_steps, 3) if run.complete and mine_steps and base_steps else None
        out.append(
            SweepPoint(
                variant=row.variant,
                d_model=row.d_model,
                rank=row.rank,
                precision=precision(run.codec),
                constrain=row.constrain or "layers",
                boundaries=row.boundaries,
                bytes_per_token=row.bytes_per_token,
                tokens=run.tokens,
                gaps=gaps,
                steps_ratio=ratio,
            )
        )
    return out


def _cells(p: SweepPoint) -> str:
    gaps = " | ".join(f"{100 * g:+.1f}%" if g is not None else "-" for g in p.gaps.values())
    ratio = f"{p.steps_ratio:.2f}" if p.steps_ratio is not None else "not reached"
    return f"{gaps} | {p.tokens / 1e6:.2f}M | {ratio}"


def markdown(pts: list[SweepPoint]) -> list[str]:
    head = " | ".join(f"gap at {t / 1e6:g}M" for t in MARKS)
    lines = [
        "## Sweeps",
        "",
        "Each row is a plain model (no extra parts) against the unconstrained model (k = d) at equal "
        "tokens; *steps ratio* is its steps to the unconstrained model's final loss over that model's "
        "steps ('not reached': it ended above that loss, or was cut short). '-': the run did not "
        "get that far.",
        "",
        "**k and precision**, every residual write in span(U) (`constrain: layers`):",
        "",
        f"| d | k | d/k | precision | B/token | {head} | reached | steps ratio |",
        "|---|---|---|---|---|" + "---|" * len(MARKS) + "---|---|",
    ]
    for p in sorted(
        (p for p in pts if p.constrain == "layers"), key=lambda p: (p.d_model, p.precision, -p.rank)
    ):
        lines.append(
            f"| {p.d_model} | {p.rank} | {p.d_model / p.rank:g} | {p.precision} | {p.bytes_per_token} "
            f"| {_cells(p)} |"
        )
    lines += [
        "",
        "**Number of boundaries**, full width inside a stage, projected at its end "
        "(`constrain: boundaries`):",
        "",
        f"| d | k | boundaries | {head} | reached | steps ratio |",
        "|---|---|---|" + "---|" * len(MARKS) + "---|---|",
    ]
    for p in sorted(
        (p for p in pts if p.constrain == "boundaries"), key=lambda p: (p.d_model, p.rank, p.boundaries)
    ):
        lines.append(f"| {p.d_model} | {p.rank} | {p.boundaries} | {_cells(p)} |")
    return lines


def plot(pts: list[SweepPoint], out: Path, title: str) -> None:
    plt = pyplot()

    fig, (ax_k, ax_b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, x_of, sel, xlabel in (
        (ax_k, lambda p: p.bytes_per_token, "layers", "bytes per token forward (log)"),
        (ax_b, lambda p: p.boundaries, "boundaries", "boundaries (k fixed)"),
    ):
        groups: dict[str, list[SweepPoint]] = {}
        for p in pts:
            if p.constrain == sel:
                key = f"d={p.d_model} {p.precision}" if sel == "layers" else f"d={p.d_model} k={p.rank}"
                groups.setdefault(key, []).append(p)
        for key, ps in sorted(groups.items()):
            ps.sort(key=x_of)
            for t, style in ((MID, "--"), (END, "-")):
                xy = [(x_of(p), 100 * g) for p in ps if (g := p.gaps.get(t)) is not None]
                if xy:
                    ax.plot(*zip(*xy, strict=True), style, marker="o", ms=4, label=f"{key}, {t / 1e6:g}M")
        ax.axhline(2, color="grey", ls=":", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gap vs unconstrained (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_k.set_xscale("log", base=2)
    ax_k.set_title(f"{title}: the gap by bytes per token (k, precision)")
    ax_b.set_title(f"{title}: the gap by number of boundaries")
    fig.tight_layout()
    fig.savefig(out / "sweeps.png", dpi=110)
    plt.close(fig)
