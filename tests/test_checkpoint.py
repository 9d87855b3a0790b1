"""A stage checkpoint is replaced whole: a save cut off at any point leaves the old one or the new one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pmnode.config import load_config
from pmnode.core import checkpoint
from pmnode.core.worker import StageWorker

CFG = load_config("tiny").with_overrides(n_stages=2)


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


def test_save_replaces_the_whole_stage(tmp_path: Path) -> None:
    checkpoint.save(_worker(3), tmp_path, "run")
    checkpoint.save(_worker(4), tmp_path, "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-1"]
    assert _step_and_weight(tmp_path)[0] == 4


def test_a_save_cut_off_between_its_renames_is_settled(tmp_path: Path) -> None:
    checkpoint.save(_worker(3), tmp_path, "run")
    dead = 2**22 + 12345  # no such process: a writer that died
    os.replace(tmp_path / "stage-1", tmp_path / f"stage-1.{dead}.old")  # first rename done...
    new = tmp_path / f"stage-1.{dead}.new"
    checkpoint.save(_worker(5), tmp_path / "other", "run")
    shutil.copytree(tmp_path / "other" / "stage-1", new)  # ...the new stage whole, not yet in place
    assert checkpoint.load_manifest(tmp_path, 1).step == 5  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "stage-1"]


def test_a_save_cut_off_while_writing_keeps_the_old_one(tmp_path: Path) -> None:
    checkpoint.save(_worker(3), tmp_path, "run")
    dead = 2**22 + 12345
    half = tmp_path / f"stage-1.{dead}.new"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"torn")  # no manifest: never finished
    step, weight = _step_and_weight(tmp_path)
    assert (step, weight) == (3, 3.0) and not half.exists()


def test_an_older_step_never_replaces_a_newer_checkpoint(tmp_path: Path) -> None:
    """Replicas of a stage may share a directory: one that fell behind keeps its hands off."""
    checkpoint.save(_worker(5), tmp_path, "run")
    checkpoint.save(_worker(4), tmp_path / "single", "run")
    checkpoint.save(_worker(3), tmp_path / "single", "run")  # `pmnode train` overwrites, as asked
    assert _step_and_weight(tmp_path / "single")[0] == 3
    shutil.rmtree(tmp_path / "single")
    with pytest.raises(checkpoint.NewerCheckpoint, match="holds step 5, later than this replica's step 3"):
        checkpoint.save(_worker(3), tmp_path, "run", keep_newer=True)
    assert _step_and_weight(tmp_path) == (5, 5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-1"]
    checkpoint.save(_worker(5), tmp_path, "run", keep_newer=True)  # the same step: replaced
    checkpoint.save(
        _worker(2), tmp_path, "other run", keep_newer=True
    )  # another run's checkpoint is not this one's
    assert _step_and_weight(tmp_path)[0] == 2
