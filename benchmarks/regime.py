"""Regime-matched real runs: the CPU `small` swarm at the link-to-compute ratio per token of a
d = 4096 stage of 4 layers on an RTX 4090 (40% MFU) at 80 Mbit/s and 50 ms.

1. measure dense:bf16 at unlimited: R tokens/s, the CPU stage's effective rate;
2. the target's ratios: link time per token over compute time per token (dense bf16 and subspace k = 40),
   and latency over a micro-batch's compute;
3. emulate the bandwidth at which 512 B/token (dense bf16 at d = 256) take the same multiple of 1/R, and
   the latency that is the same share of a CPU micro-batch; subspace:int8@8 (11 B/token) has about the
   paper's compression (8192 / 164 = 50x; 512 / 11 = 47x), so both ratios match;
4. run dense:bf16 and subspace:int8@8 at that setting, and subspace:int8@8 at unlimited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from benchmarks.calibrate import Measured, RunSpec, measure
from benchmarks.calibration import Fitted
from pmnode.config import load_config
from pmnode.plan.costs import codec_bytes, stage_costs
from pmnode.plan.gpus import gpu_named

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "benchmarks" / "plan" / "llama8b.yaml"
DENSE, SUB = "dense:bf16", "subspace:int8@8"


class Target(BaseModel):
    compute_s_per_token: float  # one 4-layer stage, fwd + bwd, RTX 4090 at 40% MFU
    dense_link_ratio: float  # link seconds per token (80 Mbit/s, dense bf16) / compute seconds per token
    subspace_link_ratio: float  # the same for subspace k = 40, fp32 coefficients
    latency_share: float  # 50 ms over one micro-batch's compute (4 x 2048 tokens)


class Regime(BaseModel):
    target: Target
    cpu_tokens_per_s: float  # measured, dense bf16, unlimited
    bandwidth_bytes_per_s: float
    latency_s: float
    cpu_dense_link_ratio: float
    cpu_subspace_link_ratio: float
    runs: list[Measured]


def target() -> Target:
    cfg = load_config(TARGET)
    body = stage_costs(cfg, DENSE)[1]  # a middle stage: 4 layers
    per_tok = body.flops_per_token / (gpu_named("rtx4090").bf16_tflops * 1e12 * 0.4)
    bw = 80e6 / 8
    sub_bytes = codec_bytes(cfg, "subspace@40")[0]
    mb = cfg.train.micro * cfg.train.seq_len
    return Target(
        compute_s_per_token=per_tok,
        dense_link_ratio=body.bytes_fwd_per_token / bw / per_tok,
        subspace_link_ratio=sub_bytes / bw / per_tok,
        latency_share=0.05 / (mb * per_tok),
    )


def spec(
    name: str, codec: str, bandwidth: str = "unlimited", latency: str = "0ms", steps: int = 60
) -> RunSpec:
    return RunSpec(name=name, config="small", stages=2, codec=codec, bandwidth=bandwidth, latency=latency,
                   inflight=8, steps=steps)  # fmt: skip


def run_regime(out: Path, console: Console) -> None:
    t = target()
    # A rerun keeps the unlimited dense measurement the link was derived from.
    old = Regime.model_validate_json(out.read_text()).runs[:1] if out.exists() else []
    base = old[0] if old else measure(spec("regime-dense-unlimited", DENSE), console)
    cpu = load_config(Path("small"))
    dense_b = codec_bytes(cpu, DENSE)[0]
    sub_b = codec_bytes(cpu, SUB)[0]
    per_tok = 1 / base.tokens_per_s
    bw = dense_b / (t.dense_link_ratio * per_tok)
    lat = t.latency_share * base.tokens_per_micro_batch * per_tok
    bw_flag, lat_flag = f"{bw * 8 / 1e3:.0f}kbit", f"{lat * 1e3:.1f}ms"
    console.print(f"CPU dense: {base.tokens_per_s:,.0f} tokens/s -> emulate {bw_flag}, {lat_flag}")
    runs = [base]

    def save() -> None:  # after every run, so a stopped sweep keeps what it measured
        regime = Regime(
            target=t,
            cpu_tokens_per_s=base.tokens_per_s,
            bandwidth_bytes_per_s=bw,
            latency_s=lat,
            cpu_dense_link_ratio=dense_b / bw / per_tok,
            cpu_subspace_link_ratio=sub_b / bw / per_tok,
            runs=runs,
        )
        out.write_text(regime.model_dump_json(indent=1))

    save()
    for s in (
        # ~10 s per dense micro-batch on the link: a short window, and more than 60 s for its queue
        spec("regime-dense-matched", DENSE, bw_flag, lat_flag, steps=20).model_copy(
            update={"inflight": 3, "warmup": 6, "request_timeout": 300.0}
        ),
        spec("regime-subspace-unlimited", SUB),
        spec("regime-subspace-matched", SUB, bw_flag, lat_flag),
    ):
        runs.append(measure(s, console))
        console.print(f"  {s.name}: {runs[-1].tokens_per_s:,.0f} tokens/s")
        save()


def write_regime(out: Path, regime: Regime, fitted: Fitted, command: str) -> list[dict]:
    """The runs beside the simulator's figures (fitted constant from the calibration)."""
    from benchmarks.calibration import predict

    rows: list[dict[str, Any]] = []
    for m in regime.runs:
        sim = predict(m, fitted)
        rows.append({"name": m.spec.name, "codec": m.spec.codec, "measured": m.tokens_per_s,
                     "simulated": sim.tokens_per_s, "binding": sim.binding,
                     "shaped": m.spec.bandwidth != "unlimited"})  # fmt: skip
    base = {r["codec"]: r for r in rows if not r["shaped"]}
    # The link alone: each unlimited run's own compute times, behind the matched link.
    unlimited = {m.spec.codec: m for m in regime.runs if m.spec.bandwidth == "unlimited"}
    for m, r in zip(regime.runs, rows, strict=True):
        u = unlimited.get(m.spec.codec)
        if u is not None and r["shaped"]:
            spec = u.spec.model_copy(
                update={k: getattr(m.spec, k) for k in ("bandwidth", "latency", "inflight")}
            )
            r["link_alone"] = predict(u.model_copy(update={"spec": spec}), fitted).tokens_per_s
    t = regime.target
    lines = [
        f"Command: `{command}`",
        "",
        f"Target: a d = 4096 stage of 4 layers on an RTX 4090 at 40% MFU computes a token in "
        f"{t.compute_s_per_token * 1e6:.1f} µs; at 80 Mbit/s a dense bf16 token takes "
        f"{t.dense_link_ratio:.2f}x that on the link, a subspace k = 40 one {t.subspace_link_ratio:.3f}x; "
        f"50 ms is {t.latency_share:.3f} of a micro-batch's compute.",
        f"Here: `small` (d = 256, 2 stages of 2 layers) ran dense bf16 at "
        f"{regime.cpu_tokens_per_s:,.0f} tokens/s unshaped, so the link is emulated at "
        f"{regime.bandwidth_bytes_per_s * 8 / 1e3:,.0f} kbit/s and {regime.latency_s * 1e3:.1f} ms: "
        f"dense bf16 (512 B/token) {regime.cpu_dense_link_ratio:.2f}x, subspace:int8@8 (11 B/token) "
        f"{regime.cpu_subspace_link_ratio:.3f}x.",
        "",
        "| run | codec | link | measured tok/s | vs own unlimited | simulated tok/s | vs own unlimited (sim) "
        "| binds (sim) | the link alone (sim) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base.get(r["codec"])
        link = "matched" if r["shaped"] else "unlimited"
        rel = f"{r['measured'] / b['measured']:.2f}" if b else "-"
        rel_sim = f"{r['simulated'] / b['simulated']:.2f}" if b else "-"
        alone = f"{r['link_alone'] / b['simulated']:.2f}" if b and "link_alone" in r else "-"
        lines.append(
            f"| {r['name']} | {r['codec']} | {link} | {r['measured']:,.0f} | {rel} | {r['simulated']:,.0f} "
            f"| {rel_sim} | {r['binding']} | {alone} |"
        )
    lines += [
        "",
        "The last column runs the unlimited run's own compute times behind the matched link: what the link "
        "costs when nothing else changes between the two runs.",
    ]
    (out / "regime.md").write_text("\n".join(lines) + "\n")
    return rows
