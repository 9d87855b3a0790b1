"""Durability: a failed checkpoint write or rename keeps the last good checkpoint, a full disk is one
line and no crash, the coordinator's state is replaced whole, and certificates outlive a 2 h
coordinator outage."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.state import SavedState, load_state, save_state
from pmnode.config import load_config
from pmnode.core import checkpoint
from pmnode.core.worker import StageWorker
from pmnode.net.auth import CERT_TTL, RENEW_BEFORE, Verifier, issue_cert, public_bytes, renewal_due
from pmnode.net.routing import HEARTBEAT_PERIOD
from pmnode.swarm.runner import Checkpoints, StageRunner
from pmnode.swarm.schedule import SYNC

CFG = load_config("tiny").with_overrides(n_stages=2)
MP = pytest.MonkeyPatch
FULL = OSError(errno.ENOSPC, "No space left on device")


def _worker(step: int) -> StageWorker:
    w = StageWorker(CFG, 1, CFG.codec_spec)
    w.step_count = step
    with torch.no_grad():
        for p in w.stage.parameters():
            p.fill_(float(step))
    return w


def _step_and_weight(root: Path) -> tuple[int, float]:
    w = StageWorker(CFG, 1, CFG.codec_spec)
    man = checkpoint.load(w, root)
    return man.step, float(next(w.stage.parameters()).detach().flatten()[0])


def _full_disk(*_: object, **__: object) -> None:
    raise FULL


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: MP) -> None:
    checkpoint.save(_worker(3), tmp_path, "run")
    monkeypatch.setattr(checkpoint, "save_file", _full_disk)
    with pytest.raises(OSError) as e:
        checkpoint.save(_worker(4), tmp_path, "run")
    assert e.value.errno == errno.ENOSPC
    assert _step_and_weight(tmp_path) == (3, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-1"]  # no half-written directory left


def test_a_failed_rename_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: MP) -> None:
    checkpoint.save(_worker(3), tmp_path, "run")
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if str(src).endswith(".new"):  # the rename that would make the new checkpoint current
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError):
        checkpoint.save(_worker(4), tmp_path, "run")
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert _step_and_weight(tmp_path) == (3, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-1"]


def test_files_are_fsynced_before_the_swap(tmp_path: Path, monkeypatch: MP) -> None:
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    checkpoint.save(_worker(3), tmp_path, "run")
    names = {Path(p).name for p in synced}
    assert {"model.safetensors", "optimizer.pt", "manifest.json", tmp_path.name} <= names
    assert any(n.startswith("stage-1.") and n.endswith(".new") for n in names)  # the directory itself


def test_a_full_disk_is_one_line_and_training_goes_on(tmp_path: Path, monkeypatch: MP) -> None:
    w = _worker(3)
    runner = StageRunner(w, CFG, SYNC, Checkpoints(tmp_path, every=1), pool=None)  # type: ignore[arg-type]
    runner._save()
    assert runner.disk_problem is None
    monkeypatch.setattr(checkpoint, "save_file", _full_disk)
    w.step_count = 4
    runner._save()  # does not raise: the stage goes on training
    assert (
        runner.disk_problem == f"disk full: cannot write under {tmp_path}; keeping the last good checkpoint"
    )
    assert _step_and_weight(tmp_path) == (3, 3.0)
    monkeypatch.undo()
    runner._save()  # space again: the next checkpoint is written and the line goes away
    assert runner.disk_problem is None and _step_and_weight(tmp_path)[0] == 4


def test_coordinator_state_is_replaced_whole(tmp_path: Path, monkeypatch: MP) -> None:
    path = tmp_path / "state.json"
    save_state(path, SavedState(run="r", global_step=5))
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError):
        save_state(path, SavedState(run="r", global_step=6))
    monkeypatch.undo()
    state = load_state(path, "r", None)
    assert state is not None and state.global_step == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_certificates_outlive_a_two_hour_coordinator_outage() -> None:
    """Fake clock: heartbeats every HEARTBEAT_PERIOD try to renew when due; the coordinator is down for
    2 h starting at every phase of the renewal cycle. The certificate must stay valid throughout."""
    authority, node = RSAPrivateKey(), RSAPrivateKey()
    verifier = Verifier("r", public_bytes(authority))
    t0, outage = 1.0e9, 2 * 3600.0
    assert outage <= RENEW_BEFORE - HEARTBEAT_PERIOD  # the policy's worst case, stated
    for phase in range(0, int(CERT_TTL), 900):
        now = t0
        cert = issue_cert(authority, "r", "peer", 1, public_bytes(node), now=now)
        down = (t0 + CERT_TTL + phase, t0 + CERT_TTL + phase + outage)
        renewals = 0
        while now < down[1] + CERT_TTL / 2:
            if renewal_due(cert, now) and not down[0] <= now < down[1]:
                cert = issue_cert(authority, "r", "peer", 1, public_bytes(node), now=now)
                renewals += 1
            assert cert.expires > now, f"certificate ran out at {now - down[0]:.0f} s into the outage"
            now += HEARTBEAT_PERIOD
        verifier.check_cert(cert, peer_id="peer", now=now)
        assert renewals >= 2


def test_a_full_disk_shows_in_the_status() -> None:
    from rich.console import Console

    from coordinator.view import swarm_status
    from pmnode.net.routing import StageRecord
    from pmnode.net.status import render

    line = "disk full: cannot write under /ckpt; keeping the last good checkpoint"
    recs = {1: [StageRecord(peer_id="p" * 40, stage=1, problem=line, time=0.0)]}
    status = swarm_status(CFG, None, members=recs, shown=recs, history=[], global_step=3, coordinator=[])
    console = Console(record=True, width=200)
    render(status, console)
    assert f"stage 1, peer {'p' * 12}: {line}" in console.export_text()
