"""A stage of over 600 MB (weights and Adam state) copied between real processes over libp2p through
the node's own guarded `state` RPC, its sender SIGKILLed in the middle of a chunk: the joiner resumes
with the other replica where the first stopped (both vouch for the same digest, each with its own
signature) and ends bit-identical to the source."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from launch import ROOT, assert_no_leftovers, kill_tagged, tagged_env, wait_until

from pmnode.net.tokens import load_or_create_key

PEER = str(ROOT / "tests" / "state_peer.py")

# d = 2048, one wide layer and the embedding in stage 0: 50.9M parameters, 611 MB with Adam's state.
BIG = {
    "name": "big",
    "model": {"vocab_size": 256, "d_model": 2048, "n_layers": 2, "n_heads": 16, "ffn_hidden": 6144},
    "n_stages": 2,
    "subspace": {"enabled": False},
    "train": {"seq_len": 16, "batch_size": 1},
}


@pytest.mark.timeout(240)
def test_a_600mb_stage_copy_survives_its_sender_killed_midway(tmp_path: Path) -> None:
    cfg = tmp_path / "big.yaml"
    cfg.write_text(yaml.safe_dump(BIG))
    tag = uuid.uuid4().hex
    env = tagged_env(tag)
    a, b, joiner = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "joiner.json"
    authority = tmp_path / "authority.key"
    load_or_create_key(authority)  # the coordinator's part: both replicas and the joiner are certified
    procs: list[subprocess.Popen] = []
    try:
        for info, pause in ((a, "15"), (b, "-1")):  # the first replica stalls mid-chunk 15, to be killed
            cmd = [sys.executable, PEER, "serve", str(cfg), str(info), str(authority), "--pause-at", pause]
            err = (tmp_path / f"{info.stem}.err").open("w")
            procs.append(subprocess.Popen(cmd, env=env, stderr=err, process_group=0))
        for info in (a, b):
            wait_until(info.exists, 150, info.name, every=0.1, procs=procs)
        sender = json.loads(a.read_text())
        assert sender["bytes"] >= 600e6
        assert json.loads(b.read_text())["digest"] == sender["digest"]  # sync replicas: the same bits
        cmd = [sys.executable, PEER, "fetch", str(cfg), str(joiner), str(authority), str(a), str(b)]
        log = (tmp_path / "joiner.err").open("w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
        # 15 of 37 chunks copied, the 16th asked for
        wait_until((tmp_path / "mid-chunk").exists, 120, "mid-chunk", every=0.1, procs=procs)
        os.killpg(procs[0].pid, signal.SIGKILL)  # the sender and its daemon, mid-chunk
        procs[0].wait(10)
        wait_until(lambda: procs[2].poll() is not None, 120, "the joiner to finish", every=0.2)
        assert procs[2].returncode == 0, (tmp_path / "joiner.err").read_text()[-2000:]
        got = json.loads(joiner.read_text())
        assert got["refused_without_hello"] == "unauthorized"  # the door is the node's, guarded
        assert got["before"] != sender["digest"]
        assert got["after"] == sender["digest"]  # every byte of weights, Adam moments, groups and step
        assert got["resumed"] == 1
        # each sender's signed digest checked against its certified key; the bytes hashed again at the end
        assert sorted(got["vouched_by"]) == sorted(
            [sender["peer"][-8:], json.loads(b.read_text())["peer"][-8:]]
        )
        assert got["copies_refused"] == []
        assert got["chunks_from"] == [15, got["chunks"] - 15]  # went on where it stopped, not over
        assert "resuming at chunk 15" in (tmp_path / "joiner.err").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        kill_tagged(tag)
    assert_no_leftovers(tag)
