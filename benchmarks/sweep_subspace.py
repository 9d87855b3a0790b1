r"""Research sweep behind the subspace defaults: which knobs close the gap to dense?

Each variant overrides a few fields of the base config and trains with the same
data, seed and steps. Writes DIR/results.json and DIR/results.md.

    python -m benchmarks.sweep_subspace --config configs/small.yaml --steps 300 \
        --out docs/benchmarks/subspace-sweep
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from pmnode.bench.plotting import pyplot
from pmnode.config import load_config
from pmnode.core.progress import train_with_progress


def ssn(mode: str, f: float, branch_norm: bool, free: int = 1, **extra: dict) -> tuple[str, dict]:
    """A subspace variant with every knob spelled out, so later default changes do not move it."""
    sub = {"mode": mode, "token_table_scale": f, "branch_norm": branch_norm, "uncompressed_tail_layers": free}
    return "subspace", {"subspace": sub, **extra}


# name -> (codec, overrides), grouped by the question each answers. k = compression_rank of the base config.
VARIANTS: dict[str, tuple[str, dict]] = {
    "dense": ("dense", {"subspace": {"enabled": False}}),
    "dense lr=1e-2": ("dense", {"subspace": {"enabled": False}, "optim": {"lr": 0.01}}),
    # Scale of the frozen table F against the residual writes.
    "proj F=1": ssn("projection", 1.0, False),
    "proj F=0.1": ssn("projection", 0.1, False),
    "proj F=0.02": ssn("projection", 0.02, False),
    # node0's pairing: F ~ N(0, 1) with a parameter-free RMSNorm on each branch output.
    "proj F=1 branch-norm": ssn("projection", 1.0, True),
    # Projection vs reparametrisation.
    "reparam F=1": ssn("reparam", 1.0, False),
    "reparam F=0.1": ssn("reparam", 0.1, False),
    "reparam F=1 branch-norm": ssn("reparam", 1.0, True),
    # Around the best: free tail layers, F scale, learning rate.
    "reparam F=1 branch-norm free-tail=0": ssn("reparam", 1.0, True, 0),
    "reparam F=1 branch-norm free-tail=2": ssn("reparam", 1.0, True, 2),
    "reparam F=2 branch-norm": ssn("reparam", 2.0, True),
    "reparam F=1 branch-norm lr=1e-2": ssn("reparam", 1.0, True, optim={"lr": 0.01}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/subspace-sweep"))
    ap.add_argument("--only", default="", help="Comma-separated variant names to run.")
    ap.add_argument("--replot", action="store_true", help="Only redraw DIR/sweep.png from DIR/results.json.")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((args.out / "results.json").read_text())["runs"], args.out / "sweep.png")
        return
    base = load_config(args.config).with_overrides(train={"steps": args.steps, "eval_every": args.steps})
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    rows = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    console = Console(stderr=True)
    for name in names:
        codec, overrides = VARIANTS[name]
        cfg = base.with_overrides(**overrides)
        s = train_with_progress(cfg, codec, "cpu", console)
        rows = [r for r in rows if r["variant"] != name]
        rows.append(
            {
                "variant": name,
                "codec": codec,
                "rank": cfg.rank if cfg.subspace.enabled else None,
                "overrides": overrides,
                "heldout_loss": round(s.heldout_loss, 4),
                "final_train_loss": round(s.final_train_loss, 4),
                "steps": s.steps,
            }
        )
        console.print(f"{name}: held-out {s.heldout_loss:.4f}")
        command = " ".join(["python", *sys.argv])
        results_path.write_text(json.dumps({"command": command, "runs": rows}, indent=2))
        dense = next((r["heldout_loss"] for r in rows if r["variant"] == "dense"), None)
        md = [f"Command: `{command}`", "", "| variant | k | held-out loss | vs dense |", "|---|---|---|---|"]
        for r in rows:
            rel = f"{100 * (r['heldout_loss'] / dense - 1):+.1f}%" if dense else "-"
            md.append(f"| {r['variant']} | {r['rank'] or '-'} | {r['heldout_loss']:.4f} | {rel} |")
        (args.out / "results.md").write_text("\n".join(md) + "\n")
        plot(rows, args.out / "sweep.png")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    names = [r["variant"] for r in rows]
    losses = [r["heldout_loss"] for r in rows]
    colors = ["tab:gray" if r["codec"] == "dense" else "tab:blue" for r in rows]
    ax.barh(names, losses, color=colors)
    dense = next((r["heldout_loss"] for r in rows if r["variant"] == "dense"), None)
    if dense:
        ax.axvline(dense, color="k", lw=0.8, ls="--", label="dense")
    ax.set_xlim(min(losses) * 0.95, max(losses) * 1.02)
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss after the sweep's steps (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
