"""Outer replica rounds in a real swarm (processes on 127.0.0.1): two replicas of each body stage
train with `replica_sync.method: outer`, async or sync, and end with one set of weights; a joiner
takes the last outer step, and its death leaves the rounds to the other."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from launch import BIN, assert_no_leftovers, head_steps, kill_tagged, swarm_config, tagged_env

from pmnode.config import RunConfig
from pmnode.core.compress import round_bytes
from pmnode.core.worker import StageWorker
from pmnode.swarm.report import NodeSummary

pytestmark = pytest.mark.slow

STEPS = 150


def _shapes(cfg: RunConfig, stage: int) -> list[tuple[int, ...]]:
    worker = StageWorker(cfg, stage, cfg.codec_spec, "cpu")
    return [tuple(p.shape) for p in worker.stage.parameters() if p.requires_grad]


@pytest.mark.parametrize("schedule", ["async", pytest.param("sync", marks=pytest.mark.long)])
def test_outer_rounds_keep_replicas_one_model(tmp_path: Path, toy_corpus: Path, schedule: str) -> None:
    """async: each replica steps on its micro-batches as they finish; sync: each steps at the head's
    commit on its own micro-batches of the step (no gradient exchange), rounds land between steps."""
    sync = {
        "method": "outer",
        "inner_steps": 5,
        "compressor": "topk",
        "exact_below": 0,
        "round_timeout": 10.0,
    }
    cfg_path = swarm_config(
        tmp_path,
        toy_corpus,
        train={"steps": STEPS, "eval_every": 100_000},
        swarm={"schedule": schedule},
        replica_sync=sync,
    )
    work, tag = tmp_path / "work", uuid.uuid4().hex
    args = ["--config", str(cfg_path), "--stages", "3", "--replicas", "2", "--schedule", schedule]
    proc = subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args, "--workdir", str(work)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "swarm.err").open("w"),
        env=tagged_env(tag),
    )
    try:
        assert proc.wait(timeout=400) == 0, (tmp_path / "swarm.err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_tagged(tag)
    cfg = RunConfig.model_validate(yaml.safe_load((work / "config.yaml").read_text()))
    head = NodeSummary.model_validate_json((work / "node-0.json").read_text())
    assert head.steps == STEPS
    for stage in (1, 2):
        pair = [
            NodeSummary.model_validate_json((work / f"{n}.json").read_text())
            for n in (f"node-{stage}", f"node-{stage}-1")
        ]
        want = round_bytes(_shapes(cfg, stage), cfg.replica_sync)
        for s in pair:
            assert s.outer is not None and s.averaging.rounds == 0  # no hivemind averaging
            assert s.outer.rounds > 0 and s.outer.refused == {} and s.outer.bytes_per_round == want
            assert 0.0 < s.outer.hidden <= 1.0 and s.outer.round_s > 0
        a, b = (s.outer for s in pair if s.outer is not None)
        # every round applied the same shares in the same order: the anchors agree, and the last
        # round (nothing trained after it) left the weights at the anchor
        assert a.anchor == b.anchor and a.weights == b.weights and a.round == b.round
        assert sum(s.samples_applied for s in pair) == STEPS * cfg.train.batch_size  # each sample once
        assert all(s.samples_off == 0 for s in pair)
    assert_no_leftovers(tag)


@pytest.mark.long  # several minutes each: scripts/check.sh --long
@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_a_joiner_takes_the_last_outer_step_and_its_death_leaves_the_round_to_the_other(
    tmp_path: Path, toy_corpus: Path, schedule: str
) -> None:
    """async: the joiner copies a replica before it serves; sync: the commit that brings it in copies
    it, mid-round if need be (the shares held travel with the copy)."""
    steps = 800  # the joiner needs a while to start: the run must outlast it by many rounds
    sync = {"method": "outer", "inner_steps": 5, "compressor": "topk", "exact_below": 0, "round_timeout": 5.0}
    cfg_path = swarm_config(
        tmp_path,
        toy_corpus,
        train={"steps": steps, "eval_every": 100_000},
        swarm={"schedule": schedule},
        replica_sync=sync,
    )
    work, tag = tmp_path / "work", uuid.uuid4().hex
    args = ["--config", str(cfg_path), "--stages", "3", "--schedule", schedule, "--workdir", str(work)]
    swarm = subprocess.Popen(
        [str(BIN / "pmnode"), "local-swarm", *args],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "swarm.err").open("w"),
        env=tagged_env(tag),
    )
    joiner_log = tmp_path / "joiner.log"
    try:
        _wait(lambda: head_steps(work) >= 30, 120, "30 steps")
        info = work / "coordinator" / "coordinator.json"
        join = [str(BIN / "pmnode"), "join", "--coordinator-file", str(info), "--stage", "1"]
        join += ["--device", "cpu", "--threads", "1"]
        joiner = subprocess.Popen(
            join,
            stdout=joiner_log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the DHT child and p2pd die with it
            env={**tagged_env(tag), "PYTHONUNBUFFERED": "1"},  # its log survives a SIGKILL
        )
        _wait(lambda: "as of its last outer step" in joiner_log.read_text(), 120, "the joiner's copy")
        at = head_steps(work)
        _wait(lambda: head_steps(work) >= at + 150, 180, "150 steps with the joiner")
        os.killpg(joiner.pid, signal.SIGKILL)  # dies mid-training, most likely mid-round
        joiner.wait(10)
        assert swarm.wait(300) == 0, (tmp_path / "swarm.err").read_text()[-3000:]
    finally:
        if swarm.poll() is None:
            swarm.kill()
        kill_tagged(tag)
    log = joiner_log.read_text()
    assert "as of its last outer step" in log, log[-2000:]
    head = NodeSummary.model_validate_json((work / "node-0.json").read_text())
    survivor = NodeSummary.model_validate_json((work / "node-1.json").read_text())
    assert head.steps == steps and survivor.outer is not None
    assert survivor.outer.rounds >= 2 and survivor.outer.refused == {}
    assert survivor.outer.bytes_received > 0  # the joiner's shares came while it lived
    assert_no_leftovers(tag)


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
