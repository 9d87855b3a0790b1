"""`pmnode bench time-to-loss`: steps to a target held-out loss × steady-state step time on a link.

It joins two measurements of the same config rather than training over a slow link for an hour:
the convergence curves of `pmnode bench convergence` (held-out loss against tokens, per codec) and
the steady-state tokens/s of `pmnode bench swarm` at the chosen bandwidth and latency. Time to
loss = tokens needed to reach the target (linear interpolation between evaluations) / tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path

from pmnode.bench.plotting import pyplot
from pmnode.errors import PmnodeError


def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Training tokens at which a (tokens, loss) curve first reaches `target`; None if it never does."""
    prev: list[float] | None = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tok)
            (t0, l0), (t1, l1) = prev, (tok, loss)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        prev = [tok, loss]
    return None


def _load(path: Path, what: str) -> dict:
    f = path / "results.json" if path.is_dir() else path
    if not f.is_file():
        raise PmnodeError(f"{f} not found: run `pmnode bench {what}` first")
    return json.loads(f.read_text())


def time_to_loss(
    convergence_dir: Path,
    swarm_dir: Path,
    *,
    codecs: list[str],
    bandwidth: str,
    target: float | None,
    out: Path,
    command: str,
) -> dict:
    conv = {r["codec"]: r for r in _load(convergence_dir, "convergence")["runs"]}
    swarm = _load(swarm_dir, "swarm")
    rates = {(r["codec"], r["bandwidth"]): r for r in swarm["runs"]}
    for c in codecs:
        if c not in conv:
            raise PmnodeError(f"no convergence run for codec {c!r} in {convergence_dir}; have {sorted(conv)}")
        if (c, bandwidth) not in rates:
            raise PmnodeError(f"no swarm run for {c!r} at {bandwidth} in {swarm_dir}")
    if target is None:  # the loss every codec reaches: the worst of their final losses
        target = max(conv[c]["heldout_loss"] for c in codecs)
    rows = []
    for c in codecs:
        r = rates[(c, bandwidth)]
        need = tokens_to_reach(conv[c]["curve"], target)
        rows.append(
            {
                "codec": c,
                "target_loss": target,
                "tokens_to_target": need,
                "tokens_per_s": r["tokens_per_s"],
                "bandwidth": bandwidth,
                "latency_ms": r["latency_ms"],
                "seconds_to_target": need / r["tokens_per_s"] if need is not None else None,
                "curve_seconds": [[tok / r["tokens_per_s"], loss] for tok, loss in conv[c]["curve"]],
            }
        )
    result = {"command": command, "convergence": str(convergence_dir), "swarm": str(swarm_dir), "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _write_md(out, rows, command)
    _plot(out, rows)
    return result


def _write_md(out: Path, rows: list[dict], command: str) -> None:
    base = rows[0]["seconds_to_target"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Target held-out loss {rows[0]['target_loss']:.4f}; links at {rows[0]['bandwidth']}, "
        f"{rows[0]['latency_ms']:g} ms one way.",
        "",
        "| codec | tokens to target | tokens/s on the link | time to target | vs first row |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        secs = r["seconds_to_target"]
        rel = f"{secs / base:.2f}" if secs and base else "-"
        lines.append(
            f"| {r['codec']} | {r['tokens_to_target'] or 0:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{'not reached' if secs is None else f'{secs:,.0f} s'} | {rel} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        xs, ys = zip(*r["curve_seconds"], strict=True)
        ax.plot(xs, ys, marker=".", label=f"{r['codec']} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.axhline(rows[0]["target_loss"], color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(f"estimated wall-clock seconds at {rows[0]['bandwidth']}, {rows[0]['latency_ms']:g} ms")
    ax.set_ylabel("held-out loss")
    ax.set_title("time to loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_to_loss.png", dpi=120)
    plt.close(fig)
