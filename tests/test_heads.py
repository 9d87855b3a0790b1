"""Several heads drive one pipeline: 2 heads x 2 replicas per stage, real processes on 127.0.0.1.

Under sync the swarm equals `pmnode train` at the heads' combined batch (2 x batch_size), step for
step, and every sample is applied exactly once: each head drove its own part of the data order, and
every node of every stage applied steps x 2 x batch_size samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from launch import (
    BIN,
    STEPS,
    assert_no_leftovers,
    head_steps,
    join_pid,
    kill_tagged,
    run_heads_swarm,
    start_async_swarm,
    swarm_config,
    tagged_env,
    wait_until,
)

from pmnode.data.shards import DataPosition
from pmnode.net.status import fetch_status

# Many processes (and, below, a joiner) on 2 cores beside another worker: a swarm run can pass 300 s.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heads"), pytest.mark.timeout(900)]

HEADS, REPLICAS, BATCH = 2, 2, 8


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> dict:
    tmp = tmp_path_factory.mktemp("heads")
    cfg = swarm_config(tmp, toy_corpus, train={"batch_size": BATCH})
    tag = uuid.uuid4().hex
    swarm = run_heads_swarm(tmp, cfg, HEADS, REPLICAS, tag)
    assert swarm.returncode == 0, swarm.stderr[-3000:]
    # The single process at the heads' combined batch: the same windows, step for step.
    single_cfg = yaml.safe_load(cfg.read_text())
    single_cfg["train"]["batch_size"] = HEADS * BATCH
    (tmp / "single.yaml").write_text(yaml.safe_dump(single_cfg))
    single = subprocess.run(
        [
            str(BIN / "pmnode"),
            "train",
            "--config",
            str(tmp / "single.yaml"),
            "--summary-json",
            str(tmp / "single.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    work = tmp / "work"
    return {
        "swarm": json.loads((tmp / "swarm.json").read_text()),
        "single": json.loads((tmp / "single.json").read_text()),
        "nodes": {p.stem: json.loads(p.read_text()) for p in work.glob("node-*.json")},
        "work": work,
        "tag": tag,
    }


def test_two_heads_two_replicas_equal_the_single_process(heads_run: dict) -> None:
    swarm, single = heads_run["swarm"]["train_losses"], heads_run["single"]["train_losses"]
    assert len(swarm) == len(single) == STEPS
    for step, (a, b) in enumerate(zip(swarm, single, strict=True)):
        assert abs(a - b) / b <= 1e-4, f"step {step}: swarm {a} vs single {b}"
    assert heads_run["swarm"]["heldout_loss"] == pytest.approx(heads_run["single"]["heldout_loss"], rel=1e-4)
    assert heads_run["swarm"]["heads"] == HEADS


def test_every_sample_applied_once_counted_per_head(heads_run: dict) -> None:
    nodes = heads_run["nodes"]
    assert len(nodes) == HEADS + 2 * REPLICAS
    heads = sorted((n for n in nodes.values() if n["stage"] == 0), key=lambda n: n["slot"])
    assert [h["slot"] for h in heads] == list(range(HEADS))
    for h in heads:  # each head drove its own batch of every step...
        assert h["samples_driven"] == STEPS * BATCH
        # ...from its own blocks of the order: slot h's next batch starts at block STEPS * HEADS + h
        pos = h["data_position"]
        assert (pos["epoch"], pos["offset"]) == (0, (STEPS * HEADS + h["slot"]) * BATCH)
    assert heads_run["swarm"]["samples_per_head"] == [STEPS * BATCH] * HEADS
    for name, n in nodes.items():  # ...and every node applied every head's samples, exactly once
        assert (n["steps"], n["samples_applied"], n["samples_off"]) == (STEPS, STEPS * HEADS * BATCH, 0), name
    man = json.loads((heads_run["work"] / "checkpoint" / "stage-0" / "manifest.json").read_text())
    assert man["step"] == STEPS and sorted(man["slots"]) == [str(h) for h in range(HEADS)]
    assert_no_leftovers(heads_run["tag"])


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_a_head_killed_mid_run_loses_no_data(tmp_path: Path, toy_corpus: Path) -> None:
    """SIGKILL one of two heads mid-run: the other goes on alone (leading, whichever it was), a new
    `pmnode join --stage 0` takes the freed slot, is brought in by a commit and reads on from the slot's
    last committed position. Every slot's blocks were trained exactly once: the batches the slots'
    final positions count are the samples every stage applied."""
    steps = 600  # long enough for a joiner to start on two busy cores (~7 steps/s with one head)
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": steps, "batch_size": BATCH, "eval_every": 1000})
    work, tag = tmp_path / "work", uuid.uuid4().hex
    swarm = start_async_swarm(cfg, work, tag, "--heads", "2", schedule="sync")
    try:
        err = {"local-swarm": work.with_suffix(".err")}
        wait_until(lambda: head_steps(work) >= 15, 180, "15 steps", every=0.5, procs=[swarm], logs=err)
        os.killpg(join_pid(tag, "node-0-1.json"), signal.SIGKILL)  # the head, its DHT child and p2pd
        killed_at = head_steps(work)
        # its record expires (until then its slot is taken and a join is refused): the coordinator says so
        maddr = json.loads((work / "coordinator" / "coordinator.json").read_text())["maddrs"][0]

        def heads() -> int:
            return len(next(s for s in fetch_status(maddr).stages if s.stage == 0).replicas)

        wait_until(lambda: heads() <= 1, 60, "the killed head's record to expire", every=0.5)
        args = [
            str(BIN / "pmnode"),
            "join",
            "--coordinator-file",
            str(work / "coordinator" / "coordinator.json"),
        ]
        args += [
            "--stage",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--summary-json",
            str(tmp_path / "joiner.json"),
        ]
        args += ["--checkpoint-dir", str(tmp_path / "joiner-ckpt")]
        log = tmp_path / "joiner.log"
        joiner = subprocess.Popen(
            args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=tagged_env(tag)
        )
        swarm.wait(400)
        assert joiner.wait(60) == 0, log.read_text()[-3000:]
    finally:
        kill_tagged(tag)
    head = json.loads((work / "node-0.json").read_text())
    joiner_summary = json.loads((tmp_path / "joiner.json").read_text())
    assert head["steps"] == joiner_summary["steps"] == steps
    assert joiner_summary["slot"] != head["slot"]  # the dead head's slot
    assert "caught up to step" in log.read_text()  # brought in by a commit, from the live head's state
    assert 0 < joiner_summary["samples_driven"] < (steps - killed_at) * BATCH
    # The slots' committed positions: slot h has read blocks h, h + 2, ..., so its batches are
    # (windows read / BATCH - h) / 2. Their samples together are exactly what every stage applied.
    man = json.loads((work / "checkpoint" / "stage-0" / "manifest.json").read_text())
    assert man["step"] == steps and sorted(man["slots"]) == ["0", "1"]
    windows = 10**9  # no epoch turns over in this run
    batches = 0
    for slot, pos in man["slots"].items():
        done = DataPosition.model_validate(pos).windows_before(windows) // BATCH - int(slot)
        assert done % 2 == 0
        batches += done // 2
    for name in ("node-1.json", "node-2.json"):
        node = json.loads((work / name).read_text())
        assert node["steps"] == steps and node["samples_off"] == 0, name
        assert node["samples_applied"] == batches * BATCH, name
    assert_no_leftovers(tag)
