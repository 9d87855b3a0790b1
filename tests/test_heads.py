"""Several heads drive one pipeline: 2 heads x 2 replicas per stage, real processes on 127.0.0.1.

Under sync the swarm equals `pmnode train` at the heads' combined batch (2 x batch_size), step for
step, and every sample is applied exactly once: each head drove its own part of the data order, and
every node of every stage applied steps x 2 x batch_size samples.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from launch import BIN, STEPS, assert_no_leftovers, kill_tagged, swarm_config, tagged_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heads")]

HEADS, REPLICAS, BATCH = 2, 2, 8


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> dict:
    tmp = tmp_path_factory.mktemp("heads")
    cfg = swarm_config(tmp, toy_corpus, train={"batch_size": BATCH})
    tag = uuid.uuid4().hex
    args = ["--config", str(cfg), "--stages", "3", "--heads", str(HEADS), "--replicas", str(REPLICAS)]
    args += ["--schedule", "sync", "--workdir", str(tmp / "work"), "--summary-json", str(tmp / "swarm.json")]
    try:
        swarm = subprocess.run(
            [str(BIN / "pmnode"), "local-swarm", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=tagged_env(tag),
        )
    finally:
        kill_tagged(tag)  # a timeout must not leave the swarm loading the next tests
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
