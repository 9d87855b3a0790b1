"""`pmnode local-swarm`: a coordinator and every stage as separate processes on 127.0.0.1.

It runs the real CLIs (`coordinator serve`, `pmnode join`), each in its own
process session so that it can signal a node together with its DHT child and
p2pd, and it always kills what is left on the way out: no orphans.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.net.auth import JOIN_TOKEN_ENV, TOKEN_FILE, new_token, read_token_file

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


class Proc:
    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.log = name, log
        self.started = time.monotonic()
        self.file = log.open("w")
        self.p = subprocess.Popen(
            args,
            stdout=self.file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)  # the whole session: the process, its DHT child and p2pd

    def stop(self, grace: float) -> None:
        if self.p.poll() is None:
            self.signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(grace)
        self.signal(signal.SIGKILL)  # whatever is left of the session, even if the leader exited
        self.p.wait()
        self.file.close()


def _wait_file(path: Path, proc: Proc, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        if proc.p.poll() is not None:
            raise PmnodeError(f"{proc.name} exited early; see {proc.log}:\n{proc.log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise PmnodeError(f"{proc.name} did not come up within {timeout:.0f}s; see {proc.log}")


def _local_token(state_dir: Path) -> str:
    """The token a resumed local swarm used before, else a fresh one."""
    path = state_dir / TOKEN_FILE
    return read_token_file(path) if path.exists() else new_token()


def _progress(cfg: RunConfig, line: dict, rates: dict, stages: int) -> Table:
    t = Table(title=f"local swarm: {cfg.name}, {stages} stages, {cfg.codec_spec}, {cfg.swarm.schedule}")
    for col in ("step", "loss", "held-out", "tokens/s", "wire out/s", "compression"):
        t.add_column(col, justify="right")
    held = line.get("heldout_loss", rates.get("held"))
    t.add_row(
        f"{line.get('step', 0)}/{cfg.train.steps}",
        f"{line.get('loss', float('nan')):.4f}",
        f"{held:.4f}" if held is not None else "-",
        f"{line.get('tokens_per_s', 0):,.0f}",
        f"{rates.get('bytes_per_s', 0) / 1e6:.2f} MB/s",
        f"{rates.get('compression', 0):.0f}x vs dense fp32",
    )
    return t


def _interrupt_on_signals() -> None:
    """Ctrl-C and `kill` both stop the swarm through the cleanup path, never leaving orphans.

    SIGINT is restored explicitly: a shell starting us in the background may have ignored it.
    SIGTERM would otherwise end this process at once and leave the stage processes running.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


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
    node_args: list[str] | None = None,
    churn: tuple[float, float] | None = None,
) -> SwarmSummary:
    if churn and replicas < 2:
        raise PmnodeError("--churn needs --replicas 2 or more: a leave must never empty a stage")
    ckpt = checkpoint_dir or workdir / "checkpoint"
    if resume and not (ckpt / "run.json").exists():
        raise PmnodeError(f"--resume: {ckpt} holds no checkpoint; run without --resume first")
    if not resume and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    _interrupt_on_signals()
    procs: list[Proc] = []
    # The join token travels in the environment: other users can read a process's arguments.
    env = {**os.environ, JOIN_TOKEN_ENV: _local_token(workdir / "coordinator")}
    # A resumed run keeps WORKDIR: the last run's address file must not be read as this one's.
    (workdir / "coordinator" / "coordinator.json").unlink(missing_ok=True)
    try:
        coord = Proc(
            "coordinator",
            [
                str(BIN / "coordinator"),
                "serve",
                "--config",
                str(cfg_path),
                "--state-dir",
                str(workdir / "coordinator"),
                *(["--http-port", str(http_port)] if http_port is not None else []),
            ],
            workdir / "logs" / "coordinator.log",
            env,
        )
        procs.append(coord)
        info = _wait_file(workdir / "coordinator" / "coordinator.json", coord, startup_timeout)
        maddr = info["maddrs"][0]
        if "http" in info:
            console.print(f"swarm status page: {info['http']}")
        nodes: dict[int, Proc] = {}
        extra: list[Proc] = []  # replicas beyond the first of stages 1..; the head is never replicated

        def spawn(s: int, r: int) -> Proc:
            name = f"node-{s}" if r == 0 else f"node-{s}-{r}"
            node = Proc(
                f"stage {s}" + (f" replica {r}" if r else ""),
                [
                    str(BIN / "pmnode"),
                    "join",
                    "--coordinator",
                    maddr,
                    "--stage",
                    str(s),
                    "--device",
                    "cpu",
                    "--checkpoint-dir",
                    str(ckpt),
                    "--summary-json",
                    str(workdir / f"{name}.json"),
                    *(["--resume"] if resume else []),
                    *(node_args or []),
                ],
                workdir / "logs" / f"{name}.log",
                env,
            )
            procs.append(node)
            return node

        plan = [(st, r) for st in reversed(range(stages)) for r in range(replicas if st else 1)]
        for s, r in plan:  # tail first, so every stage finds its next one at once
            node = spawn(s, r)
            if r == 0:
                nodes[s] = node
            else:
                extra.append(node)
        head = nodes[0]
        others = [*(nodes[s] for s in range(1, stages)), *extra]
        chaos = Churn(churn, stages, replicas, spawn, others, console) if churn else None
        _follow(cfg, head, coord, others, stages, console, chaos)
        if head.p.returncode != 0:
            raise PmnodeError(f"the head node failed; see {head.log}:\n{head.log.read_text()[-2000:]}")
        for node in others:  # they stop once "done" reaches them
            try:
                node.p.wait(30)
            except subprocess.TimeoutExpired:
                console.print(f"{node.name} did not stop in time; killing it")
        summary = json.loads((workdir / "node-0.json").read_text())
        if chaos is not None:
            chaos.report(workdir)
    finally:
        for p in reversed(procs):
            p.stop(grace=10.0)
    return SwarmSummary(
        steps=summary["steps"],
        final_train_loss=summary["final_train_loss"],
        heldout_loss=summary.get("heldout_loss"),
        tokens_per_s=summary["tokens_per_s"],
        wire_bytes_per_token_per_boundary=summary["wire_bytes_per_token_per_boundary"],
        schedule=summary["schedule"],
        codec=summary["codec"],
        stages=stages,
        replicas=replicas,
        train_losses=summary["train_losses"],
    )


class Churn:
    """`--churn`: every MIN-MAX s a replica leaves (SIGKILL and SIGINT in turn) or a new one joins.

    A leave takes a random replica of a stage that has two or more that have been up a while (a
    joiner may still be catching up), so no stage is ever emptied; a join goes to the stage with
    the fewest. The head is never touched: it owns the data.
    """

    def __init__(
        self,
        gaps: tuple[float, float],
        stages: int,
        replicas: int,
        spawn: Callable[[int, int], Proc],
        others: list[Proc],
        console: Console,
    ):
        self.gaps, self.stages, self.spawn, self.others, self.console = gaps, stages, spawn, others, console
        self.rng = random.Random()
        self.next_r = replicas  # replica numbers of joiners, so their names and files never collide
        self.turn, self.leaves, self.joins = 0, 0, 0
        self.due = time.monotonic() + self.rng.uniform(*gaps)

    def _live(self, stage: int) -> list[Proc]:
        return [o for o in self.others if o.name.split()[1] == str(stage) and o.p.poll() is None]

    def _settled(self, stage: int) -> list[Proc]:
        grace = max(10.0, self.gaps[0])
        return [o for o in self._live(stage) if time.monotonic() - o.started >= grace]

    def tick(self) -> None:
        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + self.rng.uniform(*self.gaps)
        if self.turn % 2 == 0:
            full = [s for s in range(1, self.stages) if len(self._settled(s)) >= 2]
            if full:
                victim = self.rng.choice(self._settled(self.rng.choice(full)))
                sig = (signal.SIGKILL, signal.SIGINT)[(self.turn // 2) % 2]
                self.others.remove(victim)  # gone on purpose: not a crash of the swarm
                victim.signal(sig)
                self.leaves += 1
                self.console.print(f"churn: {victim.name} leaves ({signal.Signals(sig).name})")
        else:
            stage = min(range(1, self.stages), key=lambda s: (len(self._live(s)), self.rng.random()))
            node = self.spawn(stage, self.next_r)
            self.next_r += 1
            self.others.append(node)
            self.joins += 1
            self.console.print(f"churn: {node.name} joins")
        self.turn += 1

    def report(self, workdir: Path) -> None:
        """Samples lost or counted twice, summed over the steps of every node that left a summary."""
        off = sum(json.loads(p.read_text()).get("samples_off", 0) for p in workdir.glob("node-*.json"))
        self.console.print(
            f"churn: {self.leaves} leaves, {self.joins} joins; samples lost or counted twice over every "
            f"node's steps: {off}"
        )


def _follow(
    cfg: RunConfig,
    head: Proc,
    coord: Proc,
    others: list[Proc],
    stages: int,
    console: Console,
    churn: Churn | None = None,
) -> None:
    """Show the head's progress lines until it exits; stop at once if every node of a stage dies.

    The coordinator is not on the data path: if it dies, training goes on (and a restarted one, with the
    same state dir, finds the swarm again)."""
    coord_gone, lost = False, set()
    dense_bytes = 4 * cfg.model.d_model
    rates: dict = {}
    last_t, last_bytes = time.monotonic(), 0
    with head.log.open() as f, Live(console=console, refresh_per_second=4, transient=False) as live:
        line: dict = {}
        while True:
            if churn is not None:
                churn.tick()
            raw = f.readline()
            if not raw:
                if head.p.poll() is not None:
                    break
                if not coord_gone and coord.p.poll() is not None:
                    coord_gone = True
                    console.print(
                        f"the coordinator exited (code {coord.p.returncode}; see {coord.log}); training goes "
                        "on without it"
                    )
                crashed = [o for o in others if o.p.poll() not in (None, 0)]  # clean exits race the end
                for o in crashed:
                    if o.name not in lost:
                        lost.add(o.name)
                        console.print(f"{o.name} exited (code {o.p.returncode}); see {o.log}")
                    stage = o.name.split()[1]
                    if all(p in crashed for p in others if p.name.split()[1] == stage):
                        raise PmnodeError(
                            f"every node of stage {stage} exited while training; see {o.log}:\n"
                            + "\n".join(o.log.read_text().splitlines()[-5:])
                        )
                time.sleep(0.1)
                continue
            if not raw.startswith("{"):
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            now, total = time.monotonic(), line.get("wire_bytes", 0)
            rates["bytes_per_s"] = (total - last_bytes) / max(now - last_t, 1e-9)
            last_t, last_bytes = now, total
            fwd = line.get("fwd_bytes_per_token", 0)
            rates["compression"] = dense_bytes / fwd if fwd else 0
            if "heldout_loss" in line:
                rates["held"] = line["heldout_loss"]
            live.update(_progress(cfg, line, rates, stages))
            if not console.is_terminal:
                console.print(json.dumps(line), highlight=False)
