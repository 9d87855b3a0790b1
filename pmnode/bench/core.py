"""Benchmarks of the core: codec bytes and cost, and convergence per codec."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pmnode.bench.plotting import pyplot
from pmnode.config import RunConfig
from pmnode.core.codecs import wire_bytes
from pmnode.core.progress import train_with_progress
from pmnode.core.train import config_for
from pmnode.core.worker import StageWorker


def default_codecs(cfg: RunConfig) -> list[str]:
    k = cfg.rank
    return [
        "dense",
        "dense:bf16",
        "int8",
        f"topk:{max(1, k // 2)}",
        "subspace",
        "subspace:bf16",
        "subspace:int8",
    ]


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def codec_cost(cfg: RunConfig, codec: str, device: str, reps: int = 5) -> tuple[dict, float]:
    """Bytes per token and encode+decode time over a middle stage's fwd+bwd time on one micro-batch."""
    index = min(1, cfg.n_stages - 1)
    w = StageWorker(cfg, index, codec, device)
    t, m = cfg.train, cfg.model
    tokens = torch.randint(0, m.vocab_size, (t.micro, t.seq_len), device=device)
    x = torch.randn(t.micro, t.seq_len, m.d_model, device=device) * 0.1
    if w.stage.subspace is not None:
        x = w.codec.lift(w.codec.project(x, tokens), tokens)
    c = w.codec
    z = c.project(x, tokens)
    grad = torch.randn_like(z)

    def codec_roundtrip() -> None:
        p = c.pack_activation(c.project(x, tokens), tokens)
        c.lift(c.unpack_activation(p), tokens)
        c.unpack_gradient(c.pack_gradient(grad))

    def stage_step() -> None:
        inp = x.detach().requires_grad_(not w.is_first)
        out = w.stage(None if w.is_first else inp, tokens)
        out.float().square().mean().backward()

    codec_s = _time(codec_roundtrip, reps * 4)
    step_s = _time(stage_step, reps)
    w.stage.zero_grad(set_to_none=True)
    row = {
        "name": codec,
        "bytes_per_token_forward": c.bytes_per_token_forward(),
        "bytes_per_token_backward": c.bytes_per_token_backward(),
        "ratio_vs_dense_fp32": round(4 * m.d_model / c.bytes_per_token_forward(), 2),
        "encode_decode_fraction_of_step": round(codec_s / step_s, 5),
    }
    return row, step_s


def codec_bytes(cfg: RunConfig, codec: str) -> dict:
    """Bytes per token from the codec's formulas alone: no model is built, so any size works on a laptop."""
    rank = cfg.rank if cfg.subspace.enabled else None
    fwd, bwd = wire_bytes(codec, d_model=cfg.model.d_model, vocab_size=cfg.model.vocab_size, rank=rank)
    return {
        "name": codec,
        "bytes_per_token_forward": fwd,
        "bytes_per_token_backward": bwd,
        "ratio_vs_dense_fp32": round(4 * cfg.model.d_model / fwd, 2),
        "encode_decode_fraction_of_step": None,
    }


def codec_report(cfg: RunConfig, device: str, specs: list[str] | None = None, timing: bool = True) -> dict:
    rows = []
    for spec in specs or default_codecs(cfg):
        run_cfg, codec = config_for(cfg, spec)
        row = codec_cost(run_cfg, codec, device)[0] if timing else codec_bytes(run_cfg, codec)
        rows.append({**row, "name": spec, "rank": run_cfg.rank if run_cfg.subspace.enabled else None})
    return {"d_model": cfg.model.d_model, "compression_rank": cfg.rank, "codecs": rows}


def print_codec_table(report: dict, console: Console) -> None:
    table = Table(title=f"codecs at d={report['d_model']}, k={report['compression_rank']}")
    for col in ("codec", "fwd B/token", "bwd B/token", "vs dense fp32", "enc+dec / step"):
        table.add_column(col, justify="right")
    for r in report["codecs"]:
        table.add_row(
            r["name"],
            str(r["bytes_per_token_forward"]),
            str(r["bytes_per_token_backward"]),
            f"{r['ratio_vs_dense_fp32']}x",
            "-"
            if r["encode_decode_fraction_of_step"] is None
            else f"{100 * r['encode_decode_fraction_of_step']:.2f}%",
        )
    console.print(table)


def convergence(
    cfg: RunConfig, specs: list[str], out: Path, device: str, console: Console, command: str
) -> dict:
    """Train each codec spec with identical data, seed and steps; write results.json/md and plots."""
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in specs:
        run_cfg, codec = config_for(cfg, spec)
        s = train_with_progress(run_cfg, codec, device, console)
        runs.append(
            {
                "codec": spec,
                "rank": run_cfg.rank if run_cfg.subspace.enabled else None,
                "heldout_loss": round(s.heldout_loss, 4),
                "final_train_loss": round(s.final_train_loss, 4),
                "bytes_per_token": s.bytes_per_token_forward,
                "bytes_per_token_backward": s.bytes_per_token_backward,
                "steps": s.steps,
                "tokens_per_s": round(s.tokens_per_s, 1),
                "curve": [[tok, round(loss, 4)] for _, tok, loss in s.evals],
            }
        )
        console.print(f"{spec}: held-out {s.heldout_loss:.4f}, {s.bytes_per_token_forward} B/token forward")
        _write(out, cfg, runs, command)  # after every run, so a long sweep leaves partial results
    return {"runs": runs}


def _write(out: Path, cfg: RunConfig, runs: list[dict], command: str) -> None:
    plt = pyplot()

    (out / "results.json").write_text(
        json.dumps({"command": command, "config": cfg.model_dump(), "runs": runs}, indent=2)
    )
    dense = next((r for r in runs if r["codec"] == "dense"), None)
    lines = [
        f"Command: `{command}`",
        "",
        "`bytes/token` is per boundary, per direction (forward; backward in its own column).",
        "",
        "| codec | k | held-out loss | vs dense | fwd bytes/token | bwd bytes/token | steps | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        rel = f"{100 * (r['heldout_loss'] / dense['heldout_loss'] - 1):+.1f}%" if dense else "-"
        lines.append(
            f"| {r['codec']} | {r['rank'] or '-'} | {r['heldout_loss']:.4f} | {rel} | {r['bytes_per_token']} "
            f"| {r['bytes_per_token_backward']} | {r['steps']} | {r['tokens_per_s']:,.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker=".", label=f"{r['codec']} ({r['bytes_per_token']} B/tok)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"{cfg.name}: held-out loss per codec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.scatter(r["bytes_per_token"], r["heldout_loss"], s=30)
        ax.annotate(
            r["codec"],
            (r["bytes_per_token"], r["heldout_loss"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("wire bytes per token per boundary (forward)")
    ax.set_ylabel("final held-out loss")
    ax.set_title(f"{cfg.name}: loss against wire bytes")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_bytes.png", dpi=120)
    plt.close(fig)
