"""Tables and a plot from scripts/gpu_check.sh's runs: tokens/s, MFU per stage, peak memory against
`coordinator inspect`'s estimate. MFU = (forward + backward FLOPs per token from pmnode.core.sizing)
x (tokens the stage served per second of its compute thread) / the device's peak.

    python -m benchmarks.gpu_report WORK OUT [--peak-tflops 989] [--precision bf16] [--command ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from pmnode.bench.plotting import pyplot
from pmnode.config import load_config
from pmnode.core.sizing import StageSize
from pmnode.swarm.report import NodeSummary


class StageRow(BaseModel):
    codec: str
    stage: int
    tokens_per_s_swarm: float  # the head's: the swarm's training rate, wall clock
    tokens_per_s_busy: float  # this stage's tokens per second of compute
    mfu_swarm: float
    mfu_busy: float
    peak_memory_bytes: int | None
    estimate_bytes: int


def rows(work: Path, peak_flops: float, precision: str) -> list[StageRow]:
    out = []
    for codec in ("dense", "subspace"):
        d = work / codec
        info = json.loads((d / "inspect.json").read_text())
        seq = load_config(d / "run.yaml").train.seq_len
        head = NodeSummary.model_validate_json((d / "node-0.json").read_text())
        for s in (0, 1):
            node = NodeSummary.model_validate_json((d / f"node-{s}.json").read_text())
            size = StageSize.model_validate(info["sizes"][s])
            flops = size.flops_per_token_fwd + size.flops_per_token_bwd
            tokens = node.samples_served * seq
            busy = tokens / node.busy_s if node.busy_s else 0.0
            swarm = head.tokens_per_s or 0.0
            out.append(
                StageRow(
                    codec=codec,
                    stage=s,
                    tokens_per_s_swarm=round(swarm, 1),
                    tokens_per_s_busy=round(busy, 1),
                    mfu_swarm=round(flops * swarm / peak_flops, 4),
                    mfu_busy=round(flops * busy / peak_flops, 4),
                    peak_memory_bytes=node.peak_memory_bytes,
                    estimate_bytes=size.memory_for(precision).total,
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--command", default="bash scripts/gpu_check.sh")
    a = ap.parse_args()
    precision = a.precision or "fp32"
    result = rows(a.work, a.peak_tflops * 1e12, precision)
    a.out.mkdir(parents=True, exist_ok=True)
    device = (a.work / "gpu.txt").read_text().strip()
    (a.out / "gpu.json").write_text(
        json.dumps({"device": device, "rows": [r.model_dump() for r in result]}, indent=2)
    )
    lines = [
        f"Device: {device}; precision {precision}; peak {a.peak_tflops:g} TFLOP/s. Command: `{a.command}`",
        "",
        "| codec | stage | tokens/s (swarm) | tokens/s (stage busy) | MFU swarm | MFU busy | peak GiB "
        "| estimate GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result:
        peak = f"{r.peak_memory_bytes / 2**30:.2f}" if r.peak_memory_bytes else "-"
        lines.append(
            f"| {r.codec} | {r.stage} | {r.tokens_per_s_swarm:,.0f} | {r.tokens_per_s_busy:,.0f} | "
            f"{100 * r.mfu_swarm:.1f}% | {100 * r.mfu_busy:.1f}% | {peak} | {r.estimate_bytes / 2**30:.2f} |"
        )
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r.codec} s{r.stage}" for r in result]
    ax1.bar(labels, [100 * r.mfu_busy for r in result])
    ax1.set_ylabel("MFU per stage, % (compute-busy time)")
    x = range(len(result))
    ax2.bar([i - 0.2 for i in x], [(r.peak_memory_bytes or 0) / 2**30 for r in result], 0.4, label="peak")
    ax2.bar([i + 0.2 for i in x], [r.estimate_bytes / 2**30 for r in result], 0.4, label="estimate")
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("GiB")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(a.out / "gpu.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
