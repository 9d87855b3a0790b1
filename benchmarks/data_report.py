"""Build results.json, results.md and the plots of the data benchmark from run.sh's OUT directory.

python -m benchmarks.data_report OUT
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pydantic import BaseModel

from pmnode.core.train import TrainSummary
from pmnode.data.manifest import read_manifest

HERE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "data"
NOTES = HERE / "notes.md"  # what the numbers mean, written by hand
PREPARES = {
    "byte": "byte",
    "bpe-4096": "bpe:4096 (trained here)",
    "bpe-4096-given": "bpe:4096 tokenizer.json",
}
RUNS = [("bpe-4096", "dense"), ("bpe-4096", "subspace"), ("byte", "dense"), ("byte", "subspace")]


class PrepareRow(BaseModel):
    tokenizer: str
    seconds: float  # wall clock
    cpu_seconds: float  # user + system, its worker processes included
    text_mb: float
    mb_per_s: float
    mb_per_cpu_s: float
    tokens: int
    bytes_per_token: float
    data_sha256: str


class TrainRow(BaseModel):
    data: str
    codec: str
    vocab_size: int
    steps: int
    tokens_per_s: float
    heldout_loss_nats_per_token: float
    heldout_bits_per_byte: float
    curve: list[tuple[int, float]]  # (step, held-out bits per byte)
    sample: str


class Results(BaseModel):
    prepare: list[PrepareRow]
    train: list[TrainRow]


def collect(out: Path) -> Results:
    prep = []
    for name, label in PREPARES.items():
        man = read_manifest(out / f"stdlib-{name}")
        secs, user, system = (float(v) for v in (out / f"prepare-{name}.time").read_text().split())
        mb = (man.train.text_bytes + man.heldout.text_bytes) / 1e6
        tokens = man.train.tokens + man.heldout.tokens
        prep.append(
            PrepareRow(
                tokenizer=label,
                seconds=secs,
                text_mb=round(mb, 2),
                mb_per_s=round(mb / secs, 3),
                cpu_seconds=round(user + system, 2),
                mb_per_cpu_s=round(mb / (user + system), 3),
                tokens=tokens,
                bytes_per_token=round(mb * 1e6 / tokens, 3),
                data_sha256=man.data_sha256()[:12],
            )
        )
    rows = []
    for data, codec in RUNS:
        path = out / f"train-{data}-{codec}.json"
        if not path.exists():
            continue
        s = TrainSummary.model_validate_json(path.read_text())
        ratio = read_manifest(out / f"stdlib-{data}").heldout.tokens_per_byte / math.log(2)
        sample = out / f"sample-{data}-{codec}.txt"
        rows.append(
            TrainRow(
                data=data,
                codec=codec,
                vocab_size=read_manifest(out / f"stdlib-{data}").vocab_size,
                steps=s.steps,
                tokens_per_s=round(s.tokens_per_s, 1),
                heldout_loss_nats_per_token=round(s.heldout_loss, 4),
                heldout_bits_per_byte=round(s.heldout_bits_per_byte, 4),
                curve=[(step, round(loss * ratio, 4)) for step, _, loss in s.evals],
                sample=sample.read_text() if sample.exists() else "",
            )
        )
    return Results(prepare=prep, train=rows)


def markdown(r: Results) -> str:
    lines = [
        "# Data: `pmnode data prepare` throughput and configs/bpe-small.yaml on prepared stdlib",
        "",
        "Exact commands: `run.sh` in this directory; this file, results.json and the plots come from "
        "`report.py`. Machine: 2 CPU cores shared with other work (load average 7-16 while these ran), so "
        "wall times are upper bounds; CPU seconds (the processes' user + system time) say more.",
        "",
        *(NOTES.read_text().splitlines() if NOTES.exists() else []),
        "",
        "## Prepare stdlib (31.5 MB of Python source, held-out 5 % of files)",
        "",
        "| tokenizer | wall s | CPU s | MB/s (wall) | MB per CPU s | tokens | bytes/token | data sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r.prepare:
        lines.append(
            f"| {p.tokenizer} | {p.seconds:.1f} | {p.cpu_seconds:.1f} | {p.mb_per_s:.2f} "
            f"| {p.mb_per_cpu_s:.2f} | {p.tokens:,} | {p.bytes_per_token:.2f} | `{p.data_sha256}` |"
        )
    lines += [
        "",
        "## configs/bpe-small.yaml, 2,000 steps, one thread each",
        "",
        "Held-out loss in bits per byte of text (nats/token x tokens/byte / ln 2 over the held-out "
        "split), so the BPE and byte runs of the same model compare.",
        "",
        "| data | codec | vocab | held-out nats/token | held-out bits/byte | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for t in r.train:
        lines.append(
            f"| {t.data} | {t.codec} | {t.vocab_size} | {t.heldout_loss_nats_per_token:.4f} "
            f"| **{t.heldout_bits_per_byte:.4f}** | {t.tokens_per_s:,.0f} |"
        )
    lines += [
        "",
        "![held-out bits per byte](bpb.png)",
        "",
        "## Samples",
        "",
        "`pmnode generate --prompt 'def ' --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 0` "
        "(120 tokens: BPE samples are about 3x longer in text).",
        "",
    ]
    for t in r.train:
        lines += [f"### {t.data}, {t.codec}", "", "```python", t.sample.rstrip(), "```", ""]
    return "\n".join(lines)


def plot(r: Results) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in r.train:
        steps, bpb = zip(*t.curve, strict=True)
        ax.plot(
            steps, bpb, marker="o", ms=3, label=f"{t.data} {t.codec}", ls="-" if t.codec == "dense" else "--"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("configs/bpe-small.yaml on prepared stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "bpb.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3))
    names = [p.tokenizer for p in r.prepare]
    ax.barh([f"{n} (wall)" for n in names], [p.mb_per_s for p in r.prepare])
    ax.barh([f"{n} (CPU)" for n in names], [p.mb_per_cpu_s for p in r.prepare])
    ax.set_xlabel("MB of text per second of wall clock / of CPU (2 shared cores)")
    ax.set_xscale("log")
    ax.set_title("pmnode data prepare stdlib")
    fig.tight_layout()
    fig.savefig(HERE / "prepare.png", dpi=120)


if __name__ == "__main__":
    res = collect(Path(sys.argv[1]))
    (HERE / "results.json").write_text(res.model_dump_json(indent=2))
    (HERE / "results.md").write_text(markdown(res) + "\n")
    plot(res)
