"""One launcher and typed readers for the benchmarks.

A benchmark either runs a whole CLI to its end (`pmnode train`, `pmnode local-swarm`: `train`,
`local_swarm`) or starts a coordinator and `pmnode join` nodes itself to act on them while they run
(churn kills and adds nodes, netns_shaping puts them in network namespaces: `Processes`). Processes
go through pmnode.swarm.procs.Launcher, the one local-swarm uses, so they are stopped together on the
way out, or by its reaper if the benchmark itself is killed.

What pmnode writes is read back through its own models (TrainSummary, SwarmSummary, NodeSummary,
StepLine), never as dicts by key; the spot-check report, a dict inside NodeSummary, through the
reader models below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from pmnode.core.train import TrainSummary
from pmnode.swarm.local_swarm import SwarmSummary
from pmnode.swarm.procs import Launcher, Proc, wait_coordinator
from pmnode.swarm.report import NodeSummary

BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    """An entry point of the running interpreter's environment (pmnode, coordinator)."""
    return str(BIN / name)


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None) -> None:
    """Run a CLI to its end; its stderr's tail is the error if it fails."""
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")


def train(config: Path, summary: Path) -> TrainSummary:
    """`pmnode train` of one process, its summary."""
    run_cli([cli("pmnode"), "train", "--config", str(config), "--summary-json", str(summary)])
    return TrainSummary.model_validate_json(summary.read_text())


def local_swarm(
    args: list[str], workdir: Path, *, env: dict[str, str] | None = None, timeout: float | None = None
) -> SwarmSummary:
    """`pmnode local-swarm ARGS` in WORKDIR, its summary; the nodes' are in `node_summaries(WORKDIR)`."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "swarm.json"
    run_cli(
        [cli("pmnode"), "local-swarm", *args, "--workdir", str(workdir), "--summary-json", str(out)],
        env=env,
        timeout=timeout,
    )
    return SwarmSummary.model_validate_json(out.read_text())


def node_summaries(workdir: Path) -> dict[str, NodeSummary]:
    """name (node-0, node-1-2, ...) -> the summary that node wrote on exit."""
    return {
        p.stem: NodeSummary.model_validate_json(p.read_text()) for p in sorted(workdir.glob("node-*.json"))
    }


class HeadSpotChecks(BaseModel):
    """The head's spot-check report (pmnode.swarm.spot_checks.SpotChecks.report); the fields read here."""

    counts: dict[str, int]
    banned: dict[str, Any]
    served_until_ban: dict[str, int]


class ReplicaSpotChecks(BaseModel):
    """A replica's spot-check report (pmnode.swarm.telemetry): checks it served, lies it told."""

    peer_id: str
    checks_served: int
    lies: int


class Processes:
    """A coordinator and `pmnode join` nodes started one by one, each logging to WORK/NAME.log and
    writing its summary to WORK/NAME.json; all stopped (SIGINT, `grace` seconds, SIGKILL) on exit."""

    def __init__(self, work: Path, *, env: dict[str, str] | None = None, grace: float = 10.0):
        self.work = work
        self.env = {**os.environ, **(env or {})}
        self.launcher = Launcher(grace)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.launcher.stop_all()

    @property
    def procs(self) -> list[Proc]:
        return self.launcher.procs

    def start(self, name: str, args: list[str], *, stage: int | None = None, ns: str | None = None) -> Proc:
        """ARGS as process NAME, inside network namespace NS if given."""
        prefix = ["ip", "netns", "exec", ns] if ns else []
        return self.launcher.start(name, [*prefix, *args], self.work / f"{name}.log", self.env, stage)

    def coordinator(
        self,
        config: Path,
        state: Path,
        *,
        host: str | None = None,
        ns: str | None = None,
        timeout: float = 60,
    ) -> Path:
        """Start `coordinator serve`, wait until it is up; its address file."""
        args = [cli("coordinator"), "serve", "--config", str(config), "--state-dir", str(state)]
        proc = self.start("coordinator", [*args, *(["--host", host] if host else [])], ns=ns)
        info = state / "coordinator.json"
        wait_coordinator(info, proc, timeout)
        return info

    def join(
        self, name: str, info: Path, stage: int, extra: tuple[str, ...] = (), ns: str | None = None
    ) -> Proc:
        """`pmnode join` of STAGE on one CPU thread, through the coordinator's address file."""
        args = [cli("pmnode"), "join", "--coordinator-file", str(info), "--stage", str(stage)]
        args += ["--device", "cpu", "--threads", "1", "--summary-json", str(self.work / f"{name}.json")]
        return self.start(name, [*args, *extra], stage=stage, ns=ns)

    def live(self, stage: int) -> list[Proc]:
        return [p for p in self.procs if p.stage == stage and p.p.poll() is None]

    def summary(self, name: str) -> NodeSummary | None:
        """What node NAME wrote on exit; None if it wrote nothing (SIGKILLed, or stopped while starting)."""
        path = self.work / f"{name}.json"
        return NodeSummary.model_validate_json(path.read_text()) if path.exists() else None
