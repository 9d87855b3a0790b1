"""Averaging is a door only certified replicas pass: an outsider that knows a stage's averaging prefix
(and holds a member's certificate, read off the DHT) cannot join a round, fetch state or read a part,
the replicas' rounds go on and end with one set of weights, and every refusal is counted, in the
nodes' summaries and in the coordinator's /status. Real processes on 127.0.0.1: a 3-stage async
local swarm, a second `pmnode join` for stage 1 and tests/outsider.py (stock hivemind)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from launch import (
    BIN,
    ROOT,
    assert_no_leftovers,
    head_steps,
    kill_tagged,
    swarm_config,
    tagged_env,
    wait_until,
)
from safetensors.torch import load_file

from pmnode.net.status import fetch_status

# Several minutes (1,500 async steps under the outsider's knocks): run with --long.
pytestmark = [pytest.mark.slow, pytest.mark.long]
STEPS = 1500  # async tiny, 10-30 steps/s here: long enough for the outsider's rounds and the final one


def _start(args: list[str], log: Path, tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=tagged_env(tag)
    )


@pytest.mark.timeout(600)
def test_an_outsider_cannot_average_with_a_stage(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(
        tmp_path,
        toy_corpus,
        train={"steps": STEPS, "eval_every": 100_000},
        swarm={"schedule": "async", "average_period": 2.0},
    )
    work, tag = tmp_path / "work", uuid.uuid4().hex
    info = work / "coordinator" / "coordinator.json"
    args = ["--config", str(cfg), "--stages", "3", "--workdir", str(work)]
    swarm = _start([str(BIN / "pmnode"), "local-swarm", *args], tmp_path / "swarm.log", tag)
    seen: dict[str, dict[str, int]] = {}
    try:
        wait_until(lambda: head_steps(work) >= 30, 180, "the head's 30th step", every=0.5)
        join = [str(BIN / "pmnode"), "join", "--coordinator-file", str(info), "--stage", "1"]
        join += ["--device", "cpu", "--threads", "1", "--checkpoint-dir", str(tmp_path / "joiner-ckpt")]
        joiner = _start(
            [*join, "--summary-json", str(tmp_path / "joiner.json")], tmp_path / "joiner.log", tag
        )
        out = tmp_path / "outsider.json"
        outsider = _start(
            [sys.executable, str(ROOT / "tests" / "outsider.py"), str(cfg), str(info), str(out)],
            tmp_path / "outsider.log",
            tag,
        )
        assert outsider.wait(240) == 0, (tmp_path / "outsider.log").read_text()[-3000:]
        maddr = json.loads(info.read_text())["maddrs"][0]

        def counted() -> bool:  # the replicas' heartbeats carry their refusals to the coordinator
            st = fetch_status(maddr, timeout=10)
            seen.update({r.peer_id: r.refused for r in st.stages[1].replicas})
            doors = {k for r in seen.values() for k, v in r.items() if v}
            return {"averaging.join", "averaging.state", "averaging.part"} <= doors

        wait_until(counted, 60, "the refusals in /status", every=0.5)
        assert swarm.wait(600) == 0, (tmp_path / "swarm.log").read_text()[-3000:]
        assert joiner.wait(90) == 0, (tmp_path / "joiner.log").read_text()[-3000:]
    finally:
        kill_tagged(tag)
    got = json.loads(out.read_text())
    # The outsider never was in a group, got no byte of state and no part of anyone's tensors.
    assert got["groups"] == [0, 0, 0] and got["tensors_unchanged"], got
    assert [k["state_bytes"] for k in got["knocks"]] == [0, 0], got
    # (a replica mid-round answers a part only after its round's group is registered: the reply may
    # then miss the outsider's wait; never is it an averaged part)
    assert all(set(k["part_replies"]) <= {"PROTOCOL_VIOLATION"} for k in got["knocks"]), got
    # The replicas' rounds went on: applied, none refused, the last one with both, one set of weights.
    mine = json.loads((tmp_path / "joiner.json").read_text())
    peer = json.loads((work / "node-1.json").read_text())
    for node in (mine, peer):
        assert node["averaging"]["rounds"] >= 2 and node["averaging"]["refused"] == 0, node["averaging"]
    assert "last averaging round with 2 replicas (all finished)" in (tmp_path / "joiner.log").read_text()
    assert mine["samples_applied"] + peer["samples_applied"] == STEPS * 8
    a = load_file(str(tmp_path / "joiner-ckpt" / "stage-1" / "model.safetensors"))
    b = load_file(str(work / "checkpoint" / "stage-1" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every door the outsider knocked on counted it: both replicas refused its state and part calls,
    # its join requests and its bids to lead were refused too.
    doors = {
        k: mine["averaging"]["calls_refused"][k] + peer["averaging"]["calls_refused"][k]
        for k in mine["averaging"]["calls_refused"]
    }
    assert doors["state"] == 2 and doors["part"] == 2, doors
    assert doors["join"] >= 1 and doors["leader"] >= 1 and doors["group"] == 0, doors
    assert set(seen) == set(got["members"])
    print(
        json.dumps({"refused": doors, "rounds": [mine["averaging"]["rounds"], peer["averaging"]["rounds"]]})
    )
    assert_no_leftovers(tag)
