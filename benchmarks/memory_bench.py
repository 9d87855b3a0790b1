"""Peak memory and step time of one stage under each precision/memory option, against the estimate
of pmnode.core.sizing (what `coordinator inspect` prints and `pmnode join` checks).

    python -m benchmarks.memory_bench --out docs/benchmarks/memory [--device cpu] [--steps 4]

Every option runs in a fresh process (peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA):
the body stage (stage 1 of 3) of a scaled-down Llama shape, fed random boundary coefficients and
gradients, for warm-up + timed optimizer steps of one micro-batch each.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from pydantic import BaseModel

from pmnode.bench.plotting import pyplot
from pmnode.config import RunConfig
from pmnode.core.codecs import Packet
from pmnode.core.sizing import precision_name, stage_sizes
from pmnode.core.worker import StageWorker

SHAPE = {
    "name": "memory-bench",
    "model": {
        "vocab_size": 8192,
        "d_model": 1024,
        "n_layers": 6,
        "n_heads": 16,
        "n_kv_heads": 4,
        "ffn_hidden": 2816,
        "max_seq_len": 256,
    },
    "n_stages": 3,
    "subspace": {"compression_rank": 16, "uncompressed_tail_layers": 1},
    "train": {"batch_size": 4, "micro_batch_size": 4, "seq_len": 256},
}
OPTIONS = {  # name -> (autocast_bf16, optimizer_state, checkpoint_layers, fused_adam)
    "fp32": (False, "fp32", False, False),
    "fp32 fused AdamW": (False, "fp32", False, True),
    "bf16 autocast": (True, "fp32", False, False),
    "int8 AdamW state": (False, "int8", False, False),
    "fp32 + checkpointing": (False, "fp32", True, False),
    "bf16 + int8 + checkpointing": (True, "int8", True, False),
}


class Result(BaseModel):
    option: str
    device: str
    peak_bytes: int  # the stage's: peak RSS minus the process's RSS before building it (CPU)
    estimate_bytes: int  # pmnode.core.sizing's total, without headroom
    step_s: float  # median of the timed steps (forward + backward + optimizer step)
    steps: int
    params: int


def one(option: str, device: str, steps: int, warmup: int = 2) -> Result:
    bf16, state, ckpt, fused = OPTIONS[option]
    cfg = RunConfig.model_validate(SHAPE)
    torch.set_num_threads(1)
    base = psutil.Process().memory_info().rss
    worker = StageWorker(
        cfg,
        1,
        device=device,
        autocast_bf16=bf16,
        checkpoint_layers=ckpt,
        optimizer_state=state,
        fused_adam=fused,
    )
    g = torch.Generator().manual_seed(0)
    b, t, k = cfg.train.micro, cfg.train.seq_len, cfg.rank
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for s in range(warmup + steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, t), generator=g)
        packet = worker.codec.pack_activation(torch.randn(b, t, k, generator=g), tokens)
        t0 = time.perf_counter()
        out = worker.forward(f"{s}", packet)
        worker.backward(f"{s}", Packet({"v": torch.randn(out.tensors["v"].shape, generator=g)}))
        worker.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    size = stage_sizes(cfg)[1]
    est = size.memory_for(precision_name(bf16, state))
    return Result(
        option=option,
        device=device,
        peak_bytes=peak,
        estimate_bytes=est.total_checkpointed if ckpt else est.total,
        step_s=round(statistics.median(times), 4),
        steps=steps,
        params=size.params_trainable,
    )


def report(results: list[Result], out: Path, command: str) -> None:
    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps([r.model_dump() for r in results], indent=2))
    fp32 = results[0]
    lines = [
        "| option | peak MiB | estimate MiB | peak vs fp32 | step s | step vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.option} | {r.peak_bytes / 2**20:.0f} | {r.estimate_bytes / 2**20:.0f} | "
            f"{r.peak_bytes / fp32.peak_bytes:.2f} | {r.step_s:.3f} | {r.step_s / fp32.step_s:.2f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.option for r in results]
    y = range(len(results))
    ax1.barh([i + 0.2 for i in y], [r.peak_bytes / 2**20 for r in results], 0.4, label="measured peak")
    ax1.barh([i - 0.2 for i in y], [r.estimate_bytes / 2**20 for r in results], 0.4, label="sizing estimate")
    ax1.set_yticks(list(y), names)
    ax1.set_xlabel("MiB")
    ax1.legend()
    ax2.barh(list(y), [r.step_s for r in results])
    ax2.set_yticks(list(y), [""] * len(results))
    ax2.set_xlabel("seconds per step (median)")
    fig.suptitle(f"one body stage, {results[0].params / 1e6:.1f}M parameters, {results[0].device}")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/memory"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(one(a.one, a.device, a.steps).model_dump_json())
        return
    results = []
    for option in OPTIONS:
        cmd = [sys.executable, __file__, "--one", option, "--device", a.device, "--steps", str(a.steps)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(Result.model_validate_json(line))
        r = results[-1]
        print(f"{option}: {r.peak_bytes / 2**20:.0f} MiB, {r.step_s:.3f} s/step", flush=True)
    command = f"python -m benchmarks.memory_bench --out {a.out} --device {a.device} --steps {a.steps}"
    report(results, a.out, command)


if __name__ == "__main__":
    main()
