"""The swarm outlives its coordinator: SIGKILL it mid-training, train on, restart it, it knows the swarm."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from test_swarm import BIN, assert_no_leftovers, kill_tagged, swarm_config, tagged_env

from pmnode.status import fetch_status

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path, tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own group: the DHT child and p2pd go with it
        env=tagged_env(tag),
    )


def _coordinator(cfg: Path, state: Path, log: Path, tag: str) -> tuple[subprocess.Popen, str]:
    info = state / "coordinator.json"
    info.unlink(missing_ok=True)
    args = [str(BIN / "coordinator"), "serve", "--config", str(cfg), "--state-dir", str(state)]
    p = _start(args, log, tag)
    deadline = time.monotonic() + 60
    while not info.exists():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return p, json.loads(info.read_text())["maddrs"][0]


def _head_step(log: Path) -> int:
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.startswith('{"step"')]
    return steps[-1] if steps else 0


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_training_survives_a_coordinator_restart(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": 100_000, "eval_every": 100_000})
    state, tag = tmp_path / "coord", uuid.uuid4().hex
    procs: list[subprocess.Popen] = []
    try:
        coord, maddr = _coordinator(cfg, state, tmp_path / "coord-1.log", tag)
        logs = [tmp_path / f"node-{s}.log" for s in range(3)]
        for s in (2, 1, 0):
            args = [str(BIN / "pmnode"), "join", "--coordinator-file", str(state / "coordinator.json")]
            args += ["--stage", str(s), "--device", "cpu", "--log-format", "json"]
            procs.append(_start(args, logs[s], tag))
        _wait(lambda: _head_step(logs[0]) >= 20, 120, "the head's 20th step")

        os.killpg(coord.pid, signal.SIGKILL)  # no goodbye: the coordinator, its DHT child and p2pd
        coord.wait()
        at_kill = _head_step(logs[0])
        time.sleep(5)
        assert _head_step(logs[0]) > at_kill + 10  # the data path never touches the coordinator
        assert all(p.poll() is None for p in procs)

        coord, again = _coordinator(cfg, state, tmp_path / "coord-2.log", tag)
        assert again == maddr  # same identity and port: the nodes' bootstrap address holds
        at_restart = _head_step(logs[0])

        def knows_the_swarm() -> bool:
            st = fetch_status(maddr, timeout=10)
            online = [[r for r in s.replicas if r.state == "online"] for s in st.stages]
            return all(len(o) == 1 for o in online) and st.global_step > at_restart

        _wait(knows_the_swarm, 60, "the restarted coordinator to see every stage")
        st = fetch_status(maddr, timeout=10)
        assert [s.replicas[0].stage for s in st.stages] == [0, 1, 2]
        assert _head_step(logs[0]) > at_restart and all(p.poll() is None for p in procs)
        procs.append(coord)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        kill_tagged(tag)
    assert_no_leftovers(tag)
