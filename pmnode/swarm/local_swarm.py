"""`pmnode local-swarm`: a coordinator and every stage as separate processes on 127.0.0.1.

It runs the real CLIs (`coordinator serve`, `pmnode join`) through a Launcher (pmnode.swarm.procs):
each in its own process session, so that it can signal a node together with its DHT child and
p2pd, registered before an interrupt can land, and always stopped on the way out, by this process
or, if it is killed, by the reaper: no orphans.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pmnode.config import RunConfig
from pmnode.data.resolve import prepared_dir
from pmnode.errors import PmnodeError
from pmnode.net.tokens import JOIN_TOKEN_ENV, TOKEN_FILE, new_token, read_token_file
from pmnode.swarm.churn import Churn
from pmnode.swarm.procs import Launcher, Proc, wait_coordinator
from pmnode.swarm.report import NodeSummary, StepLine

BIN = Path(sys.executable).parent


class SwarmSummary(BaseModel):
    steps: int
    final_train_loss: float
    heldout_loss: float | None
    tokens_per_s: float
    wire_bytes_per_token_per_boundary: dict[str, float]
    schedule: str
    codec: str
    stages: int
    replicas: int
    train_losses: list[float]


def _local_token(state_dir: Path) -> str:
    """The token a resumed local swarm used before, else a fresh one."""
    path = state_dir / TOKEN_FILE
    return read_token_file(path) if path.exists() else new_token()


def _interrupt_on_signals() -> None:
    """Ctrl-C and `kill` both stop the swarm through the cleanup path, never leaving orphans.

    SIGINT is restored explicitly: a shell starting us in the background may have ignored it.
    SIGTERM would otherwise end this process at once and leave the stage processes running.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


class LocalSwarm:
    """The processes of one local swarm: the coordinator, then every stage, tail first."""

    def __init__(self, cfg: RunConfig, workdir: Path, ckpt: Path, launcher: Launcher, node_args: list[str]):
        self.cfg, self.workdir, self.ckpt, self.launcher = cfg, workdir, ckpt, launcher
        self.node_args = node_args
        # The join token travels in the environment: other users can read a process's arguments.
        self.env = {**os.environ, JOIN_TOKEN_ENV: _local_token(workdir / "coordinator")}
        self.maddr = ""

    def coordinator(
        self, http_port: int | None, timeout: float, console: Console, http_token_file: Path | None = None
    ) -> Proc:
        state = self.workdir / "coordinator"
        # A resumed run keeps WORKDIR: the last run's address file must not be read as this one's.
        (state / "coordinator.json").unlink(missing_ok=True)
        args = [str(BIN / "coordinator"), "serve", "--config", str(self.workdir / "config.yaml")]
        args += [
            "--state-dir",
            str(state),
            *(["--http-port", str(http_port)] if http_port is not None else []),
            *(["--http-token-file", str(http_token_file)] if http_token_file is not None else []),
        ]
        coord = self.launcher.start("coordinator", args, self.workdir / "logs" / "coordinator.log", self.env)
        info = wait_coordinator(state / "coordinator.json", coord, timeout)
        self.maddr = info.maddrs[0]
        if info.http is not None:
            console.print(f"swarm status page: {info.http}")
        return coord

    def spawn(self, s: int, r: int) -> Proc:
        name = f"node-{s}" if r == 0 else f"node-{s}-{r}"
        args = [
            str(BIN / "pmnode"),
            "join",
            "--coordinator",
            self.maddr,
            "--stage",
            str(s),
            "--device",
            "cpu",
        ]
        args += ["--checkpoint-dir", str(self.ckpt), "--summary-json", str(self.workdir / f"{name}.json")]
        label = f"stage {s}" + (f" replica {r}" if r else "")
        return self.launcher.start(
            label, [*args, *self.node_args], self.workdir / "logs" / f"{name}.log", self.env, s
        )


def run_local_swarm(
    cfg: RunConfig,
    *,
    stages: int,
    replicas: int,
    workdir: Path,
    console: Console,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    startup_timeout: float = 60.0,
    http_port: int | None = None,
    http_token_file: Path | None = None,
    node_args: list[str] | None = None,
    churn: tuple[float, float] | None = None,
) -> SwarmSummary:
    _interrupt_on_signals()  # first: preparing the data on first use can take a minute
    if churn and replicas < 2:
        raise PmnodeError("--churn needs --replicas 2 or more: a leave must never empty a stage")
    ckpt = checkpoint_dir or workdir / "checkpoint"
    if resume and not (ckpt / "run.json").exists():
        raise PmnodeError(f"--resume: {ckpt} holds no checkpoint; run without --resume first")
    if not resume and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    # Prepared once, here (stdlib or a text path into the cache); the coordinator pins its hashes.
    cfg = cfg.with_overrides(data={"source": str(prepared_dir(cfg.data, console))})
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    launcher = Launcher()
    # One process per stage shares this machine's cores: more torch threads only oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // (stages * replicas))
    args = ["--threads", str(threads), *(["--resume"] if resume else []), *(node_args or [])]
    try:
        swarm = LocalSwarm(cfg, workdir, ckpt, launcher, args)
        coord = swarm.coordinator(http_port, startup_timeout, console, http_token_file)
        nodes: dict[int, Proc] = {}
        extra: list[Proc] = []  # replicas beyond the first of stages 1..; the head is never replicated
        for s, r in [(st, r) for st in reversed(range(stages)) for r in range(replicas if st else 1)]:
            node = swarm.spawn(s, r)  # tail first, so every stage finds its next one at once
            (extra.append(node) if r else nodes.__setitem__(s, node))
        head = nodes[0]
        others = [*(nodes[s] for s in range(1, stages)), *extra]
        chaos = Churn(churn, stages, replicas, swarm.spawn, others, console) if churn else None
        Follow(cfg, stages, console).run(head, coord, others, chaos)
        if head.p.returncode != 0:
            raise PmnodeError(f"the head node failed; see {head.log}:\n{head.log.read_text()[-2000:]}")
        for node in others:  # they stop once "done" reaches them
            try:
                node.p.wait(30)
            except subprocess.TimeoutExpired:
                console.print(f"{node.name} did not stop in time; killing it")
        summary = NodeSummary.model_validate_json((workdir / "node-0.json").read_text())
        if chaos is not None:
            chaos.report(workdir)
    finally:
        launcher.stop_all()
    return _swarm_summary(summary, stages, replicas, workdir)


def _swarm_summary(summary: NodeSummary, stages: int, replicas: int, workdir: Path) -> SwarmSummary:
    if summary.final_train_loss is None or summary.train_losses is None or summary.tokens_per_s is None:
        raise PmnodeError(f"the head trained no step; see {workdir / 'logs' / 'node-0.log'}")
    return SwarmSummary(
        steps=summary.steps,
        final_train_loss=summary.final_train_loss,
        heldout_loss=summary.heldout_loss,
        tokens_per_s=summary.tokens_per_s,
        wire_bytes_per_token_per_boundary=summary.wire_bytes_per_token_per_boundary or {},
        schedule=summary.schedule,
        codec=summary.codec,
        stages=stages,
        replicas=replicas,
        train_losses=summary.train_losses,
    )


class Follow:
    """The head's progress lines shown as a table until it exits; a stop at once if every node of a
    stage dies. The coordinator is not on the data path: if it dies, training goes on (and a
    restarted one, with the same state dir, finds the swarm again)."""

    def __init__(self, cfg: RunConfig, stages: int, console: Console):
        self.cfg, self.stages, self.console = cfg, stages, console
        self.held: float | None = None
        self.last_t, self.last_bytes, self.bytes_per_s = time.monotonic(), 0, 0.0
        self.coord_gone, self.lost = False, set[str]()

    def table(self, line: StepLine) -> Table:
        cfg = self.cfg
        now = time.monotonic()
        self.bytes_per_s = (line.wire_bytes - self.last_bytes) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_bytes = now, line.wire_bytes
        if line.heldout_loss is not None:
            self.held = line.heldout_loss
        compression = 4 * cfg.model.d_model / line.fwd_bytes_per_token if line.fwd_bytes_per_token else 0
        t = Table(
            title=f"local swarm: {cfg.name}, {self.stages} stages, {cfg.codec_spec}, {cfg.swarm.schedule}"
        )
        for col in ("step", "loss", "held-out", "tokens/s", "wire out/s", "compression"):
            t.add_column(col, justify="right")
        t.add_row(
            f"{line.step}/{cfg.train.steps}",
            f"{line.loss:.4f}",
            f"{self.held:.4f}" if self.held is not None else "-",
            f"{line.tokens_per_s:,.0f}",
            f"{self.bytes_per_s / 1e6:.2f} MB/s",
            f"{compression:.0f}x vs dense fp32",
        )
        return t

    def check(self, coord: Proc, others: list[Proc]) -> None:
        """Between lines: say when the coordinator or a node exits; stop if a whole stage is gone."""
        if not self.coord_gone and coord.p.poll() is not None:
            self.coord_gone = True
            self.console.print(
                f"the coordinator exited (code {coord.p.returncode}; see {coord.log}); "
                "training goes on without it"
            )
        crashed = [o for o in others if o.p.poll() not in (None, 0)]  # clean exits race the end
        for o in crashed:
            if o.name not in self.lost:
                self.lost.add(o.name)
                self.console.print(f"{o.name} exited (code {o.p.returncode}); see {o.log}")
            if all(p in crashed for p in others if p.stage == o.stage):
                raise PmnodeError(
                    f"every node of stage {o.stage} exited while training; see {o.log}:\n"
                    + "\n".join(o.log.read_text().splitlines()[-5:])
                )

    def run(self, head: Proc, coord: Proc, others: list[Proc], churn: Churn | None) -> None:
        with head.log.open() as f, Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                if churn is not None:
                    churn.tick()
                raw = f.readline()
                if not raw:
                    if head.p.poll() is not None:
                        return
                    self.check(coord, others)
                    time.sleep(0.1)
                    continue
                line = StepLine.parse(raw)
                if line is None:
                    continue
                live.update(self.table(line))
                if not self.console.is_terminal:
                    self.console.print(line.json_line(), highlight=False)
