r"""Direct links, a volunteer behind NAT, and a relayed link: tokens/s and what the relay carries.

    sudo .venv/bin/python -m benchmarks.nat_bench --steps 60 --out docs/benchmarks/nat

Real processes in network namespaces (benchmarks.netlab): a wan bridge, the coordinator (also the
relay) on a public address, and a two-stage swarm of `configs/small.yaml`, in three layouts:

- direct: the head and stage 1 on public addresses;
- home: stage 1 behind a NAT router that drops every inbound connection, the head public. Stage 1
  reserves a relay slot and announces its circuit address; the head may reach it through the relay
  or over a connection stage 1 opened to it (libp2p uses whichever connection exists);
- relayed: the head and stage 1 each behind its own NAT router. The head goes outbound only; nothing
  but the relay can reach stage 1, so every activation and gradient crosses the coordinator: its
  forwarder (pmnode.net.tunnel) passes each call to stage 1 over the connection stage 1 keeps to it.

For each codec (dense, subspace) and layout: the head's tokens/s (or the error that stopped it), the
bytes through the coordinator's interface per token (less the direct layout's, halved: what the relay
carried), and the CPU seconds of the coordinator (its Python process, where the forwarder runs, and
its p2pd) per million tokens. A separate probe (benchmarks.circuit_probe) measures how many bytes
one libp2p relay circuit carries before the relay resets it (why the forwarder exists).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import psutil
import typer
import yaml
from rich.console import Console

from benchmarks.circuit_probe import CircuitProbe
from benchmarks.nat_report import Run, cell, plot, table
from benchmarks.netlab import Host, Lab, can_run, sweep_stale
from pmnode.net.control import CoordinatorInfo
from pmnode.swarm.report import NodeSummary

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
console = Console()


def write_config(tmp: Path, codec: str, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "small.yaml").read_text())
    raw["codec"] = codec
    raw["subspace"]["enabled"] = codec != "dense"
    raw["train"].update(steps=steps, eval_every=10**9)
    raw.setdefault("swarm", {}).update(schedule="async")
    path = tmp / f"small-{codec}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wan_bytes(host: Host) -> int:
    out = subprocess.run(
        ["ip", "-n", host.ns, "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True
    )
    stats = json.loads(out.stdout)[0]["stats64"]
    return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])


def p2pd_cpu(pid: int) -> float:
    """User + system seconds of the p2pd daemons under `pid`."""
    total = 0.0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.name() == "p2pd":
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def tree_cpu(pid: int) -> float:
    """User + system seconds of `pid` and every process under it."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def coordinator_info(path: Path, proc: subprocess.Popen, timeout: float = 60) -> CoordinatorInfo:
    """The address file of a coordinator started in a namespace, once it is whole."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            with contextlib.suppress(ValueError):  # half written
                return CoordinatorInfo.model_validate_json(path.read_text())
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the coordinator did not come up")
        time.sleep(0.2)


def one(cfg: Path, codec: str, mode: str, tmp: Path, timeout: float, rep: int = 0) -> Run:
    state, out = tmp / f"{codec}-{mode}-{rep}", tmp / f"{codec}-{mode}-{rep}-nodes"
    out.mkdir(parents=True)
    with Lab() as lab:
        coord = lab.public("coord")
        head = lab.public("head") if mode != "relayed" else lab.home("head", lab.router("rhead"))
        body = lab.public("body") if mode == "direct" else lab.home("body", lab.router("rbody"))
        args = ["serve", "--config", str(cfg), "--host", coord.addr, "--state-dir", str(state)]
        p = coord.popen(
            [str(BIN / "coordinator"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        maddr = coordinator_info(state / "coordinator.json", p).maddrs[0]

        def join(host: Host, stage: int) -> subprocess.Popen:
            a = [
                "join",
                "--coordinator",
                maddr,
                "--token-file",
                str(state / "join_token"),
                "--stage",
                str(stage),
            ]
            a += ["--host", host.addr, "--threads", "1", "--summary-json", str(out / f"{stage}.json")]
            log = (out / f"{stage}.log").open("w")
            return host.popen([str(BIN / "pmnode"), *a], stdout=log, stderr=subprocess.STDOUT)

        join(body, 1)
        time.sleep(3)
        bytes0, cpu0, t0 = wan_bytes(coord), p2pd_cpu(p.pid), time.monotonic()
        all0 = tree_cpu(p.pid)
        h = join(head, 0)
        try:
            h.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()
        error = None
        if h.returncode != 0:
            lines = [x for x in (out / "0.log").read_text().splitlines() if x.startswith("error:")]
            error = lines[-1].removeprefix("error: ") if lines else f"exit code {h.returncode}"
        wall = time.monotonic() - t0
        moved, cpu = wan_bytes(coord) - bytes0, p2pd_cpu(p.pid) - cpu0
        all_cpu = tree_cpu(p.pid) - all0
    t = yaml.safe_load(cfg.read_text())["train"]
    summary = out / "0.json"
    s = NodeSummary.model_validate_json(summary.read_text()) if summary.exists() else None
    per_boundary = (s.wire_bytes_per_token_per_boundary if s else None) or {}
    steps = s.steps if s else 0
    return Run(
        codec=codec,
        mode=mode,
        steps=steps,
        tokens=steps * t["batch_size"] * t["seq_len"],
        tokens_per_s=s.tokens_per_s if s and error is None else None,
        error=error,
        coordinator_bytes=moved,
        relay_cpu_s=cpu,
        coordinator_cpu_s=all_cpu,
        wall_s=wall,
        wire_bytes_per_token=per_boundary.get("forward", 0.0) + per_boundary.get("backward", 0.0),
    )


def probe() -> CircuitProbe:
    """How many bytes one circuit through the coordinator-style relay carries before it is reset."""
    py = [sys.executable, "-m", "benchmarks.circuit_probe"]
    with Lab() as lab:
        coord, home = lab.public("relay"), lab.home("served", lab.router("rserved"))
        dialer = lab.home("dialer", lab.router("rdialer"))
        r = coord.popen([*py, "relay", coord.addr], stdout=subprocess.PIPE, text=True)
        assert r.stdout is not None  # stdout=PIPE
        relay = r.stdout.readline().split()[1]
        s = home.popen([*py, "serve", home.addr, relay], stdout=subprocess.PIPE, text=True)
        assert s.stdout is not None
        peer = s.stdout.readline().split()[1]
        d = dialer.run([*py, "dial", dialer.addr, relay, peer], timeout=300)
        return CircuitProbe.model_validate_json(d.stdout.strip().splitlines()[-1])


def main(
    steps: Annotated[int, typer.Option(help="Training steps per run.")] = 60,
    codecs: Annotated[str, typer.Option(help="Comma-separated codecs.")] = "dense,subspace",
    modes: Annotated[
        str, typer.Option(help="Comma-separated: direct, home, relayed.")
    ] = "direct,home,relayed",
    out: Annotated[Path, typer.Option(help="Where results go.")] = Path("docs/benchmarks/nat"),
    timeout: Annotated[float, typer.Option(help="Seconds one run may take.")] = 600.0,
    workdir: Annotated[Path | None, typer.Option(help="Keep every run's logs here.")] = None,
    repeats: Annotated[int, typer.Option(help="Runs per codec and layout; the table shows the best.")] = 2,
) -> None:
    why = can_run()
    if why is not None:
        console.print(f"error: {why}")
        raise typer.Exit(1)
    sweep_stale()
    circuit = probe()
    console.print(f"one circuit: {circuit.bytes_each_way:,} bytes each way, then {circuit.error}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="pmnat-") as d:
        tmp = Path(workdir or d)
        tmp.mkdir(parents=True, exist_ok=True)
        for codec in codecs.split(","):
            cfg = write_config(tmp, codec, steps)
            for mode in modes.split(","):
                for rep in range(repeats):
                    run = one(cfg, codec, mode, tmp, timeout, rep)
                    console.print(f"{codec:9s} {mode:8s} {cell(run):>22s} tokens/s  {run.error or ''}")
                    runs.append(run)
                    if run.error:
                        break  # a layout that fails, fails again
    out.mkdir(parents=True, exist_ok=True)
    command = "sudo .venv/bin/python -m benchmarks.nat_bench " + " ".join(sys.argv[1:])
    result = {"circuit": circuit.model_dump(), "runs": [r.model_dump() for r in runs]}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(table(runs, circuit, command.strip()))
    plot(runs, out / "tokens.png")
    console.print(f"wrote {out}/results.json, results.md, tokens.png")


if __name__ == "__main__":
    typer.run(main)
