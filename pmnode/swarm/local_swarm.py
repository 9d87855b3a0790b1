"""`pmnode local-swarm`: a coordinator and every stage as separate processes on 127.0.0.1.

It runs the real CLIs (`coordinator serve`, `pmnode join`) through a Launcher (pmnode.swarm.procs):
each in its own process session, so that it can signal a node together with its DHT child and
p2pd, registered before an interrupt can land, and always stopped on the way out, by this process
or, if it is killed, by the reaper: no orphans.
"""

from __future__ import annotations

import contextlib
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
    heads: int = 1
    samples_per_head: list[int] = []  # samples of each head's own batches in applied steps, by slot
    train_losses: list[float]  # every head's batch together: the mean of the heads' step losses


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
    heads = cfg.swarm.heads
    # One process per stage shares this machine's cores: more torch threads only oversubscribe them.
    threads = max(1, (os.cpu_count() or 1) // (heads + (stages - 1) * replicas))
    args = ["--threads", str(threads), *(["--resume"] if resume else []), *(node_args or [])]
    try:
        swarm = LocalSwarm(cfg, workdir, ckpt, launcher, args)
        coord = swarm.coordinator(http_port, startup_timeout, console, http_token_file)
        nodes: dict[int, Proc] = {}
        extra: list[Proc] = []  # replicas beyond the first of stages 1..
        more_heads: list[Proc] = []  # heads beyond the first (swarm.heads); churn never touches them
        for s, r in [(st, r) for st in reversed(range(stages)) for r in range(replicas if st else heads)]:
            node = swarm.spawn(s, r)  # tail first, so every stage finds its next one at once
            if not r:
                nodes[s] = node
            else:
                (extra if s else more_heads).append(node)
        head = nodes[0]
        others = [*(nodes[s] for s in range(1, stages)), *extra]
        chaos = Churn(churn, stages, replicas, swarm.spawn, others, console) if churn else None
        Follow(cfg, stages, console).run(head, coord, others, chaos)
        for node in [head, *more_heads]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.p.wait(120)  # the heads finish together (sync) or each its own steps (async)
            if node.p.returncode == 0:
                continue
            if node is head:
                raise PmnodeError(f"{node.name} failed; see {node.log}:\n{node.log.read_text()[-2000:]}")
            # another head that died: its part of the data went on through a replacement, or waits
            console.print(f"{node.name} exited (code {node.p.returncode}); see {node.log}")
        for node in others:  # they stop once "done" reaches them
            try:
                node.p.wait(30)
            except subprocess.TimeoutExpired:
                console.print(f"{node.name} did not stop in time; killing it")
        names = ["node-0", *(f"node-0-{r}" for r in range(1, heads))]
        found = [workdir / f"{n}.json" for n in names if (workdir / f"{n}.json").exists()]
        summaries = [NodeSummary.model_validate_json(p.read_text()) for p in found]
        if chaos is not None:
            chaos.report(workdir)
    finally:
        launcher.stop_all()
    return _swarm_summary(summaries, stages, replicas, workdir)


def _swarm_summary(heads: list[NodeSummary], stages: int, replicas: int, workdir: Path) -> SwarmSummary:
    """The run as its heads saw it: losses averaged over the heads (equal batches), tokens/s summed,
    the held-out loss of the head that evaluated (the leader)."""
    for h in heads:
        if h.final_train_loss is None or h.train_losses is None or h.tokens_per_s is None:
            raise PmnodeError(f"a head trained no step; see the node-0* logs in {workdir / 'logs'}")
    heads = sorted(heads, key=lambda h: h.slot)
    first, n = heads[0], min(len(h.train_losses or []) for h in heads)
    losses = [sum((h.train_losses or [])[i] for h in heads) / len(heads) for i in range(n)]
    return SwarmSummary(
        steps=first.steps,
        final_train_loss=losses[-1],
        heldout_loss=next((h.heldout_loss for h in heads if h.heldout_loss is not None), None),
        tokens_per_s=sum(h.tokens_per_s or 0.0 for h in heads),
        wire_bytes_per_token_per_boundary=first.wire_bytes_per_token_per_boundary or {},
        schedule=first.schedule,
        codec=first.codec,
        stages=stages,
        replicas=replicas,
        heads=len(heads),
        samples_per_head=[h.samples_driven or 0 for h in heads],
        train_losses=losses,
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
