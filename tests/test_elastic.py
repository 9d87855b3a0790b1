"""The swarm outlives its coordinator: SIGKILL it mid-training, train on, restart it, it knows the swarm."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from launch import (
    BIN,
    assert_no_leftovers,
    interrupt_all,
    join_pid,
    kill_tagged,
    swarm_config,
    tagged_env,
    wait_until,
)
from safetensors.torch import load_file

from pmnode.core import checkpoint
from pmnode.net.status import fetch_status

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
    wait_until(info.exists, 60, "the coordinator to start", every=0.2, procs=[p], logs={"coordinator": log})
    return p, json.loads(info.read_text())["maddrs"][0]


def _head_step(log: Path) -> int:
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.startswith('{"step"')]
    return steps[-1] if steps else 0


def test_training_survives_a_coordinator_restart(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": 100_000, "eval_every": 100_000})
    state, tag = tmp_path / "coord", uuid.uuid4().hex
    procs: list[subprocess.Popen] = []
    try:
        coord, maddr = _coordinator(cfg, state, tmp_path / "coord-1.log", tag)
        logs = [tmp_path / f"node-{s}.log" for s in range(3)]
        for s in (2, 1, 0):
            args = [str(BIN / "pmnode"), "join", "--coordinator-file", str(state / "coordinator.json")]
            args += ["--stage", str(s), "--device", "cpu", "--threads", "1", "--log-format", "json"]
            procs.append(_start(args, logs[s], tag))
        wait_until(lambda: _head_step(logs[0]) >= 20, 120, "the head's 20th step")

        os.killpg(coord.pid, signal.SIGKILL)  # no goodbye: the coordinator, its DHT child and p2pd
        coord.wait()
        at_kill = _head_step(logs[0])
        # the data path never touches the coordinator: 10 more steps come without it
        wait_until(lambda: _head_step(logs[0]) > at_kill + 10, 60, "10 steps without the coordinator")
        assert all(p.poll() is None for p in procs)

        coord, again = _coordinator(cfg, state, tmp_path / "coord-2.log", tag)
        assert again == maddr  # same identity and port: the nodes' bootstrap address holds
        at_restart = _head_step(logs[0])

        def knows_the_swarm() -> bool:
            st = fetch_status(maddr, timeout=10)
            online = [[r for r in s.replicas if r.state == "online"] for s in st.stages]
            return all(len(o) == 1 for o in online) and st.global_step > at_restart

        wait_until(knows_the_swarm, 60, "the restarted coordinator to see every stage")
        st = fetch_status(maddr, timeout=10)
        assert [s.replicas[0].stage for s in st.stages] == [0, 1, 2]
        assert _head_step(logs[0]) > at_restart and all(p.poll() is None for p in procs)
        procs.append(coord)
    finally:
        interrupt_all(procs, tag)
    assert_no_leftovers(tag)


def _local_swarm(cfg: Path, work: Path, tag: str, *extra: str) -> subprocess.Popen:
    """`pmnode local-swarm` of 3 stages in the background; stderr to WORK/../swarm.err."""
    args = ["--config", str(cfg), "--stages", "3", "--workdir", str(work), *extra]
    return subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args],
        stdout=subprocess.DEVNULL,
        stderr=(work.parent / "swarm.err").open("w"),
        env=tagged_env(tag),
    )


class _Processes:
    """A test's coordinator and `pmnode join` processes (logs and summaries in `base`), stopped together."""

    def __init__(self, base: Path, tag: str, info: Path):
        self.base, self.tag, self.info = base, tag, info
        self.procs: list[subprocess.Popen] = []

    def join(self, name: str, *extra: str) -> subprocess.Popen:
        args = [str(BIN / "pmnode"), "join", "--coordinator-file", str(self.info), "--device", "cpu"]
        args += ["--threads", "1"]  # as local-swarm's own nodes: one process per stage shares the cores
        args += ["--log-format", "json", "--summary-json", str(self.base / f"{name}.json"), *extra]
        p = _start(args, self.base / f"{name}.log", self.tag)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        interrupt_all(self.procs, self.tag)


def _run_with_a_joiner(cfg: Path, work: Path, tag: str, after_steps: int) -> Path:
    """A 3-stage local swarm that a `pmnode join --stage 1` (its own checkpoint dir and summary beside
    WORK) joins once the head is `after_steps` in; waits for both to finish. Returns the joiner's log."""
    swarm = _local_swarm(cfg, work, tag)
    base = work.parent
    try:
        head_log = work / "logs" / "node-0.log"
        wait_until(
            lambda: head_log.exists() and _head_step(head_log) >= after_steps, 120, f"{after_steps} steps"
        )
        joiner_log = base / "joiner.log"
        args = [
            str(BIN / "pmnode"),
            "join",
            "--coordinator-file",
            str(work / "coordinator" / "coordinator.json"),
        ]
        args += [
            "--stage",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--checkpoint-dir",
            str(base / "joiner-ckpt"),
        ]
        args += ["--summary-json", str(base / "joiner.json")]
        joiner = _start(args, joiner_log, tag)
        assert swarm.wait(300) == 0, (base / "swarm.err").read_text()[-3000:]
        assert joiner.wait(60) == 0, joiner_log.read_text()[-3000:]
    finally:
        kill_tagged(tag)
    return joiner_log


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_a_replica_killed_mid_training_loses_no_micro_batch(tmp_path: Path, toy_corpus: Path) -> None:
    steps = 150
    cfg = swarm_config(
        tmp_path, toy_corpus, train={"steps": steps, "eval_every": 1000}, swarm={"request_timeout": 20.0}
    )
    work, tag = tmp_path / "work", uuid.uuid4().hex
    swarm = _local_swarm(cfg, work, tag, "--replicas", "2", "--schedule", "sync")
    try:
        head_log = work / "logs" / "node-0.log"
        wait_until(lambda: head_log.exists() and _head_step(head_log) >= 30, 120, "30 steps")
        victim = join_pid(tag, "node-1-1.json")
        os.killpg(victim, signal.SIGKILL)  # the replica, its DHT child and its p2pd, mid-step
        killed_at, step_at_kill = time.monotonic(), _head_step(head_log)
        wait_until(
            lambda: _head_step(head_log) > step_at_kill + 5, 20.0, "training to go on within the timeout"
        )
        recovered = time.monotonic() - killed_at
        assert swarm.wait(300) == 0, (tmp_path / "swarm.err").read_text()[-3000:]
    finally:
        kill_tagged(tag)
    head = json.loads((work / "node-0.json").read_text())
    assert head["steps"] == steps and head["samples_applied"] == steps * 8
    # Every stage applied every sample of every step once: the survivors count exactly what the head did.
    for name in ("node-1.json", "node-2.json", "node-2-1.json"):
        node = json.loads((work / name).read_text())
        assert (node["steps"], node["samples_applied"]) == (steps, steps * 8), name
    assert not (work / "node-1-1.json").exists()  # it never got to write one
    print(json.dumps({"recovered_s": round(recovered, 2), "reissued": head["reissued"]}))
    assert_no_leftovers(tag)


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_a_replica_joining_mid_run_catches_up_and_stays_identical(tmp_path: Path, toy_corpus: Path) -> None:
    steps = 400  # tiny runs ~15 steps/s: long enough for a node to start, announce and be committed with
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": steps, "eval_every": 1000})
    work, tag = tmp_path / "work", uuid.uuid4().hex
    joiner_log = _run_with_a_joiner(cfg, work, tag, after_steps=20)
    caught = [line for line in joiner_log.read_text().splitlines() if "caught up to step" in line]
    assert len(caught) == 1, joiner_log.read_text()[-2000:]
    joined_at = int(caught[0].split("caught up to step ")[1].split()[0])
    assert 20 <= joined_at < steps
    summary = json.loads((tmp_path / "joiner.json").read_text())
    assert summary["steps"] == steps and summary["samples_applied"] == steps * 8
    assert summary["server"]["messages_received"]["forward"] > 0  # it served after catching up
    # Replicas sum the same gradients in the same order: the joiner's weights and optimizer state
    # are bit-identical to its peer's after every step, here after the last one.
    mine, peer = tmp_path / "joiner-ckpt" / "stage-1", work / "checkpoint" / "stage-1"
    a, b = load_file(str(mine / "model.safetensors")), load_file(str(peer / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = torch.load(mine / "optimizer.pt"), torch.load(peer / "optimizer.pt")
    for i, st in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in st.items() if torch.is_tensor(v))
    assert_no_leftovers(tag)


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_an_empty_stage_pauses_the_swarm_until_a_node_takes_it_over(tmp_path: Path, toy_corpus: Path) -> None:
    steps = 200
    cfg = swarm_config(
        tmp_path, toy_corpus, train={"steps": steps, "eval_every": 1000}, swarm={"request_timeout": 8.0}
    )
    state, ckpt, tag = tmp_path / "coord", tmp_path / "ckpt", uuid.uuid4().hex
    run = _Processes(tmp_path, tag, state / "coordinator.json")

    try:
        coord, _ = _coordinator(cfg, state, tmp_path / "coord.log", tag)
        run.procs.append(coord)
        every = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"]
        nodes = {s: run.join(f"node-{s}", "--stage", str(s), *every) for s in (2, 1, 0)}
        head_log = tmp_path / "node-0.log"
        wait_until(lambda: _head_step(head_log) >= 30, 120, "30 steps")
        os.killpg(nodes[1].pid, signal.SIGKILL)  # stage 1's only node: the stage is empty
        nodes[1].wait()
        wait_until(lambda: "training paused" in head_log.read_text(), 60, "the head to pause")
        paused_at = _head_step(head_log)
        assert paused_at < steps

        # Without a checkpoint it must not serve stage 1 from random weights.
        refused = run.join("no-checkpoint")
        assert refused.wait(60) == 1
        said = (tmp_path / "no-checkpoint.log").read_text().strip().splitlines()
        assert f"stage 1 has no node and the swarm is at step {paused_at}" in said[-1]
        assert "Traceback" not in "\n".join(said)
        assert _head_step(head_log) == paused_at

        saved = checkpoint.load_manifest(ckpt, 1)
        assert saved is not None and saved.step <= paused_at
        taker = run.join("taker", *every)  # no --stage: the coordinator sends it to the empty stage
        assert coord.poll() is None
        assert taker.wait(300) == 0, (tmp_path / "taker.log").read_text()[-3000:]
        for s in (0, 2):
            assert nodes[s].wait(60) == 0, (tmp_path / f"node-{s}.log").read_text()[-3000:]
    finally:
        run.stop()
    log = (tmp_path / "taker.log").read_text()
    assert f"serving from its checkpoint of step {saved.step}" in log
    head, tail = (json.loads((tmp_path / f"node-{s}.json").read_text()) for s in (0, 2))
    taker_sum = json.loads((tmp_path / "taker.json").read_text())
    assert taker_sum["stage"] == 1 and taker_sum["steps"] == steps
    assert taker_sum["steps_lost"] == paused_at - saved.step
    # The taker's weights saw every step after its checkpoint; the others saw every step, once each.
    assert taker_sum["samples_applied"] == (steps - taker_sum["steps_lost"]) * 8
    for node in (head, tail):
        assert (node["steps"], node["samples_applied"], node["samples_off"]) == (steps, steps * 8, 0)
    assert taker_sum["samples_off"] == 0 and head["paused_s"] > 0
    print(json.dumps({"paused_at": paused_at, "checkpoint": saved.step, "paused_s": head["paused_s"]}))
    assert_no_leftovers(tag)


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_async_replicas_average_with_hivemind_and_end_with_one_set_of_weights(
    tmp_path: Path, toy_corpus: Path
) -> None:
    steps = 600  # async tiny with a joiner, 5-10 steps/s here: the joiner is in for many 2 s rounds
    cfg = swarm_config(
        tmp_path,
        toy_corpus,
        train={"steps": steps, "eval_every": 100_000},
        swarm={"schedule": "async", "average_period": 2.0},
    )
    work, tag = tmp_path / "work", uuid.uuid4().hex
    joiner_log = _run_with_a_joiner(cfg, work, tag, after_steps=30)
    log = joiner_log.read_text()
    assert "stage 1: copied replica" in log, log[-2000:]  # never served from random weights
    head = json.loads((work / "node-0.json").read_text())
    assert head["steps"] == steps and head["heldout_loss"] < 1.0  # the toy corpus is learnable
    mine = json.loads((tmp_path / "joiner.json").read_text())
    peer = json.loads((work / "node-1.json").read_text())
    assert mine["server"]["messages_received"]["forward"] > 0  # it took a share of the micro-batches
    assert mine["averaging"]["rounds"] >= 2 and mine["averaging"]["refused"] == 0
    assert peer["averaging"]["rounds"] >= 2 and mine["samples_off"] == peer["samples_off"] == 0
    # Each sample went through one replica of stage 1, once: their steps together apply the head's.
    assert mine["samples_applied"] + peer["samples_applied"] == steps * 8
    # After the last round both take the lowest peer's result: one set of weights for the stage.
    a = load_file(str(tmp_path / "joiner-ckpt" / "stage-1" / "model.safetensors"))
    b = load_file(str(work / "checkpoint" / "stage-1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(json.dumps({"rounds": mine["averaging"]["rounds"], "tokens_per_s": head["tokens_per_s"]}))
    assert_no_leftovers(tag)


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_a_new_head_takes_over_from_the_checkpoint(tmp_path: Path, toy_corpus: Path) -> None:
    steps = 200
    cfg = swarm_config(
        tmp_path, toy_corpus, train={"steps": steps, "eval_every": 1000}, swarm={"request_timeout": 8.0}
    )
    state, ckpt, tag = tmp_path / "coord", tmp_path / "ckpt", uuid.uuid4().hex
    run = _Processes(tmp_path, tag, state / "coordinator.json")

    every = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"]

    def join(name: str, *extra: str) -> subprocess.Popen:
        return run.join(name, *every, *extra)

    try:
        coord, maddr = _coordinator(cfg, state, tmp_path / "coord.log", tag)
        run.procs.append(coord)
        nodes = {s: join(f"node-{s}", "--stage", str(s)) for s in (2, 1, 0)}
        wait_until(lambda: _head_step(tmp_path / "node-0.log") >= 30, 120, "30 steps")
        os.killpg(nodes[0].pid, signal.SIGKILL)  # the head: nothing drives the data now
        nodes[0].wait()
        wait_until(lambda: 0 in fetch_status(maddr).empty_stages, 60, "the coordinator to see stage 0 empty")
        taker = join("taker")  # no --stage: the coordinator sends it to the empty stage 0
        assert taker.wait(300) == 0, (tmp_path / "taker.log").read_text()[-3000:]
        for s in (1, 2):
            assert nodes[s].wait(60) == 0, (tmp_path / f"node-{s}.log").read_text()[-3000:]
    finally:
        run.stop()
    head = json.loads((tmp_path / "taker.json").read_text())
    took = re.search(
        r"stage 0 had no node: serving from its checkpoint of step (\d+) .*?; the swarm is at step (\d+)",
        re.sub(r"\s+", " ", (tmp_path / "taker.log").read_text()),  # the console wraps its lines
    )
    assert took is not None
    saved, swarm_at = int(took[1]), int(took[2])
    # the head saved every 10 steps and died at step 30 or later: its last checkpoint is at most 10 behind
    assert saved % 10 == 0 and saved >= 30 and 0 <= swarm_at - saved <= 10
    assert head["stage"] == 0 and head["steps"] == steps and head["steps_lost"] == swarm_at - saved
    # The stages that kept their node applied every sample of every step once, the new head's included.
    for s in (1, 2):
        node = json.loads((tmp_path / f"node-{s}.json").read_text())
        assert (node["steps"], node["samples_applied"], node["samples_off"]) == (steps, steps * 8, 0)
    assert head["samples_applied"] == (steps - head["steps_lost"]) * 8 and head["samples_off"] == 0
    assert head["heldout_loss"] < 2.5
    assert_no_leftovers(tag)
