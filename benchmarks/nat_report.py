"""The NAT benchmark's report (benchmarks/nat_bench.py): one run's figures, the table and the plot."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from benchmarks.circuit_probe import CircuitProbe
from pmnode.bench.plotting import pyplot


class Run(BaseModel):
    codec: str
    mode: str  # direct | home | relayed
    steps: int
    tokens: int
    tokens_per_s: float | None
    error: str | None = None  # why the head stopped, when it failed
    coordinator_bytes: int  # rx + tx on the coordinator's wan interface during the run
    relay_cpu_s: float  # the coordinator's p2pd, user + system, during the run
    coordinator_cpu_s: float = 0.0  # the coordinator's Python process and its p2pd, during the run
    wall_s: float
    wire_bytes_per_token: float  # the head's own count, per token per boundary (both directions)


def cell(r: Run | None) -> str:
    if r is None:
        return "-"
    if r.tokens_per_s is None:
        return f"failed at step {r.steps}"
    return f"{r.tokens_per_s:,.0f}"


def best(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """Per codec and layout, the run with the most tokens/s (a failed one only if all failed)."""
    out: dict[tuple[str, str], Run] = {}
    for r in runs:
        old = out.get((r.codec, r.mode))
        if old is None or (r.tokens_per_s or 0.0) > (old.tokens_per_s or 0.0):
            out[(r.codec, r.mode)] = r
    return out


def _carried(r: Run | None, direct: Run | None) -> str:
    """Bytes the relay carried per token: the coordinator's interface less the direct layout's, halved."""
    if r is None or direct is None or not r.tokens or r.error:
        return "-"
    base = direct.coordinator_bytes / max(direct.tokens, 1)
    return f"{max(r.coordinator_bytes / r.tokens - base, 0) / 2:,.1f}"


def _cpu(r: Run | None) -> str:
    if r is None or not r.tokens or r.error:
        return "-"
    return f"{r.coordinator_cpu_s / r.tokens * 1e6:.1f}"


def table(runs: list[Run], circuit: CircuitProbe, command: str) -> str:
    by = best(runs)
    n = max(sum(1 for x in runs if (x.codec, x.mode) == k) for k in by)
    lines = [
        "# Volunteers behind NAT: direct links, a home node, and both neighbours behind NAT",
        "",
        f"Command: `{command}`",
        "",
        "`small` (d = 256, 4 layers, 2 stages, batch 16 × 64 tokens), async, one core per node, real",
        "processes in network namespaces (benchmarks/netlab.py) on a 2-core machine; no latency or",
        f"bandwidth limit added; best of {n} runs per cell (each run starts its own coordinator and nodes).",
        "*direct*: head and stage 1 public. *home*: stage 1 behind a NAT router that drops inbound",
        "connections, the head public. *relayed*: both behind NAT routers; the head goes outbound only,",
        "so every activation and gradient crosses the coordinator, whose forwarder (`net.tunnel`) passes",
        "each call to stage 1 over the connection stage 1 keeps to it.",
        "",
        "| codec | B/token (wire, both ways) | direct tokens/s | home tokens/s | relayed tokens/s "
        "| relay bytes/token (home / relayed) | coordinator CPU s per 1M tokens (direct / home / relayed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for codec in dict.fromkeys(r.codec for r in runs):
        d, h, rl = by.get((codec, "direct")), by.get((codec, "home")), by.get((codec, "relayed"))
        wire = next((r.wire_bytes_per_token for r in (d, h, rl) if r and r.wire_bytes_per_token), 0.0)
        lines.append(
            f"| {codec} | {wire:,.0f} | {cell(d)} | {cell(h)} | {cell(rl)} "
            f"| {_carried(h, d)} / {_carried(rl, d)} | {_cpu(d)} / {_cpu(h)} / {_cpu(rl)} |"
        )
    errors = [f"- {r.codec}, {r.mode}: `{r.error}`" for r in by.values() if r.error]
    if errors:
        lines += ["", "Runs that stopped:", "", *errors]
    lines += [
        "",
        f"**One libp2p relay circuit carried {circuit.bytes_each_way:,} bytes each way** ({circuit.calls} "
        f"echoes of {circuit.chunk:,} bytes) before the relay reset it"
        + (f" (`{circuit.error}`)." if circuit.error else "; no reset up to the probe's cap."),
        "hivemind 1.1.12's p2pd ignores its limit flags, so a circuit cannot carry a training stream",
        "(one forward of `small` is 66 KiB with subspace, 1 MiB dense, and its gradient comes back the",
        "same way); pmnode forwards its own calls instead, over plain connections, which have no cap.",
        "",
        "Every run, with its coordinator bytes and CPU, is in `results.json`.",
        "",
        "*relay bytes/token*: bytes through the coordinator's interface per token, less the direct",
        "layout's (DHT and status traffic), halved (each relayed byte goes in and out). *coordinator",
        "CPU*: user + system seconds of the coordinator's Python process (where the forwarder runs) and",
        "its p2pd, from the head's start to its end, per million training tokens; the direct column is",
        "what the coordinator costs with nothing to relay.",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    plt = pyplot()

    codecs = list(dict.fromkeys(r.codec for r in runs))
    modes = ("direct", "home", "relayed")
    by = {k: r.tokens_per_s or 0.0 for k, r in best(runs).items()}
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    width = 0.27
    for i, mode in enumerate(modes):
        xs = [j + (i - 1) * width for j in range(len(codecs))]
        ax.bar(xs, [by.get((c, mode), 0.0) for c in codecs], width, label=mode)
    ax.set_xticks(range(len(codecs)), codecs)
    ax.set_ylabel("tokens/s (head); 0 = failed")
    ax.set_title("small, 2 stages: direct, stage 1 at home, both behind NAT (relayed)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
