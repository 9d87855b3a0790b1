r"""Kernel-level check of the in-process link shaper: the same 2-stage swarm, shaped two ways.

    sudo python -m benchmarks.netns_shaping --bandwidth 2mbit --out docs/benchmarks/netns-shaping

1. kernel: two network namespaces joined by a veth pair whose both ends are shaped by `tc ... tbf`
   at --bandwidth. The coordinator and stage 0 run in one namespace, stage 1 in the other, so every
   activation and gradient crosses the shaped link. No latency is added (netem is not available).
2. in-process: the same swarm on 127.0.0.1 with `--link-bandwidth` at the same rate.

The codec is dense so that the link, not the CPU, bounds throughput at a few Mbit/s. Reports both
tokens/s and their ratio. Needs root, iproute2 and tc; cleans up namespaces and processes on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.launch import Processes, local_swarm
from pmnode.swarm.local_swarm import SwarmSummary
from pmnode.swarm.report import NodeSummary

BIN = Path(sys.executable).parent
NS = ("pmnode-a", "pmnode-b")
ADDR = ("10.77.0.1", "10.77.0.2")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def setup(rate: str) -> None:
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh(
        "ip",
        "link",
        "add",
        "pmveth-a",
        "netns",
        NS[0],
        "type",
        "veth",
        "peer",
        "name",
        "pmveth-b",
        "netns",
        NS[1],
    )
    for ns, dev, addr in zip(NS, ("pmveth-a", "pmveth-b"), ADDR, strict=True):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        # Egress shaping on both ends: activations one way, gradients the other.
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kbit",
            "latency",
            "400ms",
        )


def teardown() -> None:
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def config(tmp: Path, steps: int) -> Path:
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())
    raw.update(n_stages=2, codec="dense")
    raw["subspace"]["enabled"] = False
    raw["train"].update(steps=steps, eval_every=10**9)
    raw.setdefault("swarm", {}).update(schedule="async")
    path = tmp / "netns.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def kernel_run(cfg: Path, tmp: Path, timeout: float) -> NodeSummary:
    """The coordinator and stage 0 in one namespace, stage 1 in the other; the head's summary."""
    with Processes(tmp, grace=15.0) as procs:
        info = procs.coordinator(cfg, tmp / "coord", host=ADDR[0], ns=NS[0])
        for stage in (1, 0):
            procs.join(f"node-{stage}", info, stage, ("--host", ADDR[stage]), ns=NS[stage])
        head = procs.procs[-1]
        head.p.wait(timeout)
        if head.p.returncode != 0:
            raise SystemExit(f"head failed: {head.log.read_text()[-2000:]}")
    summary = procs.summary("node-0")
    assert summary is not None and summary.tokens_per_s is not None
    return summary


def inprocess_run(cfg: Path, tmp: Path, bandwidth: str, timeout: float) -> SwarmSummary:
    args = ["--config", str(cfg), "--stages", "2", "--link-bandwidth", bandwidth]
    return local_swarm(args, tmp / "local", timeout=timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", default="2mbit", help="tc rate, also the in-process --link-bandwidth")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/netns-shaping"))
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("ip"):
        raise SystemExit("needs root with iproute2's ip and tc")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmnode-netns-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        cfg = config(tmp, args.steps)
        try:
            setup(args.bandwidth)
            kernel = kernel_run(cfg, tmp, args.timeout)
        finally:
            teardown()
        local = inprocess_run(cfg, tmp, args.bandwidth, args.timeout)
    rows: dict[str, dict[str, Any]] = {
        "kernel_tbf": {
            "tokens_per_s": round(kernel.tokens_per_s or 0.0, 1),
            "wire_bytes_per_token_per_boundary": kernel.wire_bytes_per_token_per_boundary,
        },
        "in_process": {
            "tokens_per_s": round(local.tokens_per_s, 1),
            "wire_bytes_per_token_per_boundary": local.wire_bytes_per_token_per_boundary,
        },
    }
    ratio = rows["in_process"]["tokens_per_s"] / rows["kernel_tbf"]["tokens_per_s"]
    command = "sudo python " + " ".join(sys.argv)
    result = {
        "command": command,
        "bandwidth": args.bandwidth,
        "codec": "dense",
        "steps": args.steps,
        "stages": 2,
        "runs": rows,
        "in_process_over_kernel": round(ratio, 3),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    bpt = rows["kernel_tbf"]["wire_bytes_per_token_per_boundary"]["forward"]
    (args.out / "results.md").write_text(
        f"Command: `{command}`\n\n"
        f"tiny, dense codec ({bpt:.0f} B/token/boundary forward), 2 stages, async, {args.steps} steps, "
        f"link at {args.bandwidth} both ways.\n\n"
        "| shaping | tokens/s |\n|---|---|\n"
        "| kernel: veth + tc tbf between two network namespaces | "
        f"{rows['kernel_tbf']['tokens_per_s']:,.0f} |\n"
        f"| in-process: `--link-bandwidth {args.bandwidth}` on 127.0.0.1 | "
        f"{rows['in_process']['tokens_per_s']:,.0f} |\n\n"
        f"In-process / kernel: {ratio:.2f}\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
