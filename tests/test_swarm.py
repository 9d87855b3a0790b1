"""Real swarms on 127.0.0.1: a coordinator and stage processes started through the real CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from launch import (
    BIN,
    STEPS,
    assert_no_leftovers,
    kill_tagged,
    leftovers,
    start_async_swarm,
    swarm_config,
    tagged_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("swarm")]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> dict:
    tmp = tmp_path_factory.mktemp("sync")
    cfg = swarm_config(tmp, toy_corpus)
    tag = uuid.uuid4().hex
    swarm = subprocess.run(
        [
            str(BIN / "pmnode"),
            "local-swarm",
            "--config",
            str(cfg),
            "--stages",
            "3",
            "--schedule",
            "sync",
            "--workdir",
            str(tmp / "work"),
            "--summary-json",
            str(tmp / "swarm.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=tagged_env(tag),
    )
    assert swarm.returncode == 0, swarm.stderr[-3000:]
    single = subprocess.run(
        [str(BIN / "pmnode"), "train", "--config", str(cfg), "--summary-json", str(tmp / "single.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    return {
        "swarm": json.loads((tmp / "swarm.json").read_text()),
        "single": json.loads((tmp / "single.json").read_text()),
        "nodes": [json.loads((tmp / "work" / f"node-{s}.json").read_text()) for s in range(3)],
        "work": tmp / "work",
        "tag": tag,
    }


def test_sync_swarm_matches_single_process(sync_run: dict) -> None:
    swarm, single = sync_run["swarm"]["train_losses"], sync_run["single"]["train_losses"]
    assert len(swarm) == len(single) == STEPS
    for step, (a, b) in enumerate(zip(swarm, single, strict=True)):
        assert abs(a - b) / b <= 1e-4, f"step {step}: swarm {a} vs single {b}"
    assert swarm[-1] < swarm[0] - 0.5
    assert sync_run["swarm"]["heldout_loss"] == pytest.approx(sync_run["single"]["heldout_loss"], rel=1e-4)


def test_bytes_on_the_wire(sync_run: dict) -> None:
    """Per token, per boundary, per direction: the codec's coefficients (tiny ships the remedy: int8,
    k x 1 + a 2-byte fp16 scale) + 1 (uint8 token id) forward, the same less the token backward, plus
    framing: a 4-byte length and a JSON header (<= 400 bytes) per message and one uint8 target per
    sequence (the tail rebuilds the other targets from the token ids)."""
    cfg = yaml.safe_load((sync_run["work"] / "config.yaml").read_text())
    k, seq, micro = (
        cfg["subspace"]["compression_rank"],
        cfg["train"]["seq_len"],
        cfg["train"]["micro_batch_size"],
    )
    q = k + 2  # int8 coefficients and their scale
    n_msgs = STEPS * cfg["train"]["batch_size"] // micro
    tokens = n_msgs * micro * seq
    for node in sync_run["nodes"][:-1]:  # the sender side of each of the two boundaries
        c = node["client"]
        assert c["messages_sent"]["forward"] == c["messages_received"]["forward"] == n_msgs
        assert c["payload_sent"]["forward"] == tokens * (q + 1) + n_msgs * micro
        assert c["payload_received"]["forward"] == tokens * q
        framing_fwd = c["bytes_sent"]["forward"] - c["payload_sent"]["forward"]
        framing_bwd = c["bytes_received"]["forward"] - c["payload_received"]["forward"]
        assert 0 < framing_fwd <= n_msgs * 404 and 0 < framing_bwd <= n_msgs * 404
    # The receiving side counted the same bytes.
    for up, down in zip(sync_run["nodes"][:-1], sync_run["nodes"][1:], strict=True):
        assert up["client"]["bytes_sent"]["forward"] == down["server"]["bytes_received"]["forward"]
        assert up["client"]["bytes_received"]["forward"] == down["server"]["bytes_sent"]["forward"]
    per_token = sync_run["swarm"]["wire_bytes_per_token_per_boundary"]
    assert per_token["forward_payload"] == pytest.approx(q + 1 + 1 / seq)
    assert per_token["backward_payload"] == pytest.approx(q)


def test_sync_run_leaves_checkpoint_and_no_processes(sync_run: dict) -> None:
    for s in range(3):
        man = json.loads((sync_run["work"] / "checkpoint" / f"stage-{s}" / "manifest.json").read_text())
        assert man["step"] == STEPS and man["stage"] == s and man["fingerprint"]
        assert (sync_run["work"] / "checkpoint" / f"stage-{s}" / "model.safetensors").stat().st_size > 0
    assert leftovers(sync_run["tag"]) == []


def test_async_trains_and_sigint_cleans_up(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": 2000, "eval_every": 10})
    tag = uuid.uuid4().hex
    work = tmp_path / "work"
    proc = start_async_swarm(cfg, work, tag)
    try:
        helds: list[float] = []
        deadline = time.monotonic() + 300
        while len(helds) < 4 and time.monotonic() < deadline:  # four evaluations: steps 10..40
            time.sleep(1)
            log = work / "logs" / "node-0.log"
            if log.exists():
                done = log.read_text().rpartition("\n")[0]  # whole lines only: the node may be mid-write
                lines = [json.loads(x) for x in done.splitlines() if x.startswith("{")]
                helds = [x["heldout_loss"] for x in lines if "heldout_loss" in x]
            assert proc.poll() is None, work.with_suffix(".err").read_text()[-3000:]
        assert len(helds) >= 4, "async swarm made no progress (deadlock?)"
        assert helds[-1] < helds[0] - 0.3
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_leftovers(tag)


def _resume(work: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "pmnode"),
            "local-swarm",
            "--config",
            str(work / "config.yaml"),
            "--stages",
            "3",
            "--steps",
            str(steps),
            "--workdir",
            str(work),
            "--resume",
            "--summary-json",
            str(work / "resumed.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_continues_from_the_checkpoint(sync_run: dict, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(sync_run["work"], work)
    out = _resume(work, STEPS + 10)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((work / "resumed.json").read_text())
    assert resumed["steps"] == STEPS + 10 and len(resumed["train_losses"]) == 10
    before = sync_run["swarm"]["train_losses"]
    # It picks up at the trained loss level, far below where a fresh model starts.
    assert abs(resumed["train_losses"][0] - before[-1]) < 0.25 * (before[0] - before[-1])
    for s in range(3):
        man = json.loads((work / "checkpoint" / f"stage-{s}" / "manifest.json").read_text())
        assert man["step"] == STEPS + 10
    node0 = json.loads((work / "node-0.json").read_text())
    assert (
        node0["samples_applied"]
        == (STEPS + 10) * yaml.safe_load((work / "config.yaml").read_text())["train"]["batch_size"]
    )

    # A checkpoint of another basis is refused with one clear line, and nothing hangs.
    man_path = work / "checkpoint" / "stage-1" / "manifest.json"
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps({**man, "fingerprint": "0" * 16}))
    out = _resume(work, STEPS + 20)
    assert out.returncode == 1 and "fingerprint" in out.stderr and "Traceback" not in out.stderr


def test_generate_from_the_swarm_checkpoint(sync_run: dict) -> None:
    """What the swarm learned, as text: all stages of its checkpoint loaded into one sampler."""
    args = [str(BIN / "pmnode"), "generate", "--checkpoint", str(sync_run["work"] / "checkpoint")]
    out = subprocess.run(
        [*args, "--prompt", "the swarm ", "--max-new-tokens", "40", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("the swarm ") and len(out.stdout.rstrip("\n")) > len("the swarm ")
    assert "step 30" in out.stderr  # it says which checkpoint it sampled from
    again = subprocess.run(
        [*args, "--prompt", "the swarm ", "--max-new-tokens", "40", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.stdout == out.stdout  # greedy is deterministic


def test_periodic_checkpoint_survives_sigkill(tmp_path: Path, toy_corpus: Path) -> None:
    """Kill -9 every process mid-training: the checkpoint is whole, at a multiple of N, and loads."""
    every = 5
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": 2000, "eval_every": 1000})
    tag = uuid.uuid4().hex
    work = tmp_path / "work"
    proc = start_async_swarm(cfg, work, tag, "--checkpoint-every", str(every))
    try:
        deadline = time.monotonic() + 240
        steps = 0
        while steps < 4 * every and time.monotonic() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, work.with_suffix(".err").read_text()[-3000:]
            log = work / "logs" / "node-0.log"
            if log.exists():
                done = log.read_text().rpartition("\n")[0]  # whole lines only: the node may be mid-write
                rows = [json.loads(x) for x in done.splitlines() if x.startswith("{")]
                steps = max([0, *(r["step"] for r in rows)])
        assert steps >= 4 * every
    finally:
        kill_tagged(tag)  # SIGKILL: no exit path runs, only what was saved along the way survives
        proc.wait()
    ckpt = work / "checkpoint"
    for s in range(3):
        man = json.loads((ckpt / f"stage-{s}" / "manifest.json").read_text())
        assert man["step"] >= every and man["step"] % every == 0 and man["stage"] == s
    out = subprocess.run(
        [str(BIN / "pmnode"), "generate", "--checkpoint", str(ckpt), "--prompt", "a "],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("a "), out.stderr[-2000:]
