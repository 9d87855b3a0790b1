"""Prepared data in a real swarm: a SIGKILLed local swarm resumes at its data position, and a head
whose data has another tokenizer than the run's is refused with one line."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from launch import (
    BIN,
    ROOT,
    assert_no_leftovers,
    head_steps,
    kill_tagged,
    one_line_error,
    start_async_swarm,
    swarm_config,
    tagged_env,
)

from pmnode.config import load_config
from pmnode.core import checkpoint
from pmnode.core.train import train
from pmnode.data.prepare import prepare
from pmnode.data.resolve import open_data
from pmnode.data.shards import DataPosition
from pmnode.swarm.report import StepLine

pytestmark = pytest.mark.slow
STEPS, EVERY = 30, 4


def _lines(work: Path) -> list[StepLine]:
    text = (work / "logs" / "node-0.log").read_text()
    return [line for raw in text.splitlines() if (line := StepLine.parse(raw)) is not None]


@pytest.mark.long  # a variant of a scenario CI runs: scripts/check.sh --long
def test_sigkilled_swarm_resumes_at_its_data_position(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": STEPS, "eval_every": 1000})
    tag, work = uuid.uuid4().hex, tmp_path / "work"
    args = ("--checkpoint-every", str(EVERY))
    proc = start_async_swarm(cfg, work, tag, *args, schedule="sync")
    try:
        deadline = time.monotonic() + 240
        while head_steps(work) < 2 * EVERY + 2:
            assert proc.poll() is None and time.monotonic() < deadline, work.with_suffix(".err").read_text()
            time.sleep(0.1)
        proc.kill()  # SIGKILL of local-swarm: its reaper stops the nodes
        proc.wait()
        assert_no_leftovers(tag, within=40.0)
        killed_at = max(line.step for line in _lines(work))
        man = checkpoint.load_manifest(work / "checkpoint", 0)
        # the checkpoint of a multiple of EVERY, or the one the nodes saved as the reaper stopped them
        # (a step may be done and saved before the head's log line for it is written: + 1)
        assert man is not None and 2 * EVERY <= man.step <= killed_at + 1 < STEPS
        run_cfg = load_config(work / "config.yaml")
        t = run_cfg.train
        data = open_data(run_cfg.data, t.seq_len, run_cfg.model.vocab_size)
        n = data.train.windows
        assert n > STEPS * t.batch_size  # one epoch covers the run: no window may come twice
        assert man.data == DataPosition.after(man.step * t.batch_size, n)

        r = subprocess.run(
            [str(BIN / "pmnode"), "local-swarm", "--config", str(cfg), "--stages", "3", "--schedule", "sync",
             "--workdir", str(work), "--resume"],
            capture_output=True, text=True, timeout=300, env=tagged_env(tag),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        kill_tagged(tag)
    resumed = _lines(work)
    assert [line.step for line in resumed] == list(range(man.step + 1, STEPS + 1))
    print(f"killed at step {killed_at}, checkpoint of step {man.step}, resumed at {resumed[0].step}")
    # Every step reads the windows after the last one's: the run's windows are one epoch's first ones.
    for line in resumed:
        want = DataPosition.after(line.step * t.batch_size, n)
        assert DataPosition(epoch=line.epoch, offset=line.offset) == want
    windows = data.train.take(DataPosition(), STEPS * t.batch_size, t.seed)[0].tolist()
    assert len(set(windows)) == len(windows)
    # ... and they are the windows an uninterrupted run trains on: the same losses as `pmnode train`.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node of a 3-stage local swarm on this machine
    try:
        reference = train(run_cfg, run_cfg.codec_spec).train_losses
    finally:
        torch.set_num_threads(threads)
    got = [line.loss for line in resumed]
    assert got == pytest.approx(reference[man.step :], rel=1e-3)


@pytest.fixture()
def coordinator_on(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(config, state dir): a `coordinator serve` of a tiny run whose data is a prepared directory."""
    runs: list[subprocess.Popen] = []

    def start(cfg: Path) -> Path:
        state = tmp_path / "coord"
        cmd = [str(BIN / "coordinator"), "serve", "--config", str(cfg), "--state-dir", str(state)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(p)
        deadline = time.monotonic() + 60
        while not (state / "coordinator.json").exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        return state

    yield start  # type: ignore[misc]
    for p in runs:
        p.terminate()
        p.wait(30)


def test_head_with_another_tokenizer_is_refused(tmp_path: Path, toy_corpus: Path, coordinator_on) -> None:
    ours, theirs = tmp_path / "byte", tmp_path / "bpe"
    prepare([str(toy_corpus)], ours, "byte", heldout=0.1)
    other = prepare([str(toy_corpus)], theirs, "bpe:300", heldout=0.1)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {"source": str(ours)}
    del cfg["model"]["vocab_size"]  # from the tokenizer: 256
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    state = coordinator_on(path)
    env = {**os.environ, "PMNODE_JOIN_TOKEN": (state / "join_token").read_text().strip()}
    r = subprocess.run(
        [str(BIN / "pmnode"), "join", "--coordinator-file", str(state / "coordinator.json"), "--stage", "0",
         "--device", "cpu", "--data", str(theirs)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    pinned = load_config(path).data  # the coordinator pinned the hashes of `ours`
    from pmnode.data.manifest import read_manifest

    mine = read_manifest(ours)
    hashes = (mine.tokenizer_sha256[:12], other.tokenizer_sha256[:12])
    one_line_error(r, "tokenizer mismatch", *hashes, str(theirs))
    assert pinned.tokenizer_sha256 is None  # the file itself pins nothing: the coordinator did
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
