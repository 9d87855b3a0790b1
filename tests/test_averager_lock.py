"""A node never hangs on hivemind's averager: a tensor lock it cannot get in time fails the round."""

from __future__ import annotations

import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch

from pmnode.swarm import averaging
from pmnode.swarm.averaging import AveragerStuck, StageAverager


def _fake(lock: object) -> StageAverager:
    avg = StageAverager.__new__(StageAverager)  # no hivemind process: only the lock matters here
    avg.averager = SimpleNamespace(lock_averaged_tensors=lock, _averaged_tensors=[torch.ones(3)])
    avg.timeout = 0.0
    return avg


def test_a_held_lock_fails_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(averaging, "LOCK_WAIT", 0.2)
    lock = mp.Lock()
    avg = _fake(lock)
    with avg._tensors() as tensors:  # free: the tensors, and the lock is released after
        assert torch.equal(tensors[0], torch.ones(3))
    assert lock.acquire(timeout=0.1)  # held now, as a cancelled all-reduce can leave it
    with pytest.raises(AveragerStuck), avg._tensors():
        pass
    lock.release()
