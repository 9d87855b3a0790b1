"""Stage checkpoints: safetensors weights, optimizer state and a manifest that explains them.

Layout:
    DIR/run.json                  the RunConfig, so the checkpoint can be loaded without the swarm
    DIR/stage-{i}/
        model.safetensors   the stage's weights (U and F are never saved: they come from the seed)
        optimizer.pt        AdamW state
        manifest.json       step, stage, layer range, subspace fingerprint, run name, samples,
                            and for the head the data position of the next step
A stage is written whole into a new directory (manifest last) and fsynced, which then takes the
old one's place by two renames; a crash between them is settled at the next read or write (`_settle`). So a
crash at any moment leaves the previous complete checkpoint or the new one, never a mix of files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file

from pmnode.config import RunConfig, format_validation_error
from pmnode.core.durable import atomic_write, fsync_path, fsync_tree
from pmnode.core.worker import StageWorker
from pmnode.data.shards import DataPosition
from pmnode.errors import ConfigError, PmnodeError


class Manifest(BaseModel):
    run: str
    stage: int
    layers: tuple[int, int]
    step: int
    samples: int = 0
    fingerprint: str | None
    codec: str
    data: DataPosition | None = None  # the head's: where the next step's windows start
    slots: dict[int, DataPosition] = {}  # several heads: every slot's committed position at `step`


RUN_CONFIG = "run.json"


class NewerCheckpoint(PmnodeError):
    """The stage's directory holds a later step than the one being saved: it is kept."""


def stage_dir(root: Path, stage: int) -> Path:
    return root / f"stage-{stage}"


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    # The pid keeps concurrent writers (every node of a local swarm writes run.json) off each other's tmp.
    atomic_write(path, write, path.with_name(f"{path.name}.{os.getpid()}.tmp"))


def _writer_gone(path: Path) -> bool:
    """Whether the process that named `stage-i.PID.new|old` is this one or no longer runs."""
    pid = int(path.name.split(".")[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _settle(root: Path, stage: int) -> None:
    """Finish or undo a save that a dead writer left between its two renames; drop its leftovers.
    (Replicas of one stage may write the same directory: a live writer's files are left alone.)"""
    d = stage_dir(root, stage)
    left = [
        p for p in (*root.glob(f"stage-{stage}.*.new"), *root.glob(f"stage-{stage}.*.old")) if _writer_gone(p)
    ]
    if not d.exists():
        whole = [p for p in left if p.suffix == ".new" and (p / "manifest.json").exists()]
        whole += [p for p in left if p.suffix == ".old"]
        if whole:
            os.replace(whole[0], d)
            left.remove(whole[0])
    for p in left:
        shutil.rmtree(p, ignore_errors=True)


def save(
    worker: StageWorker,
    root: Path,
    run: str,
    samples: int = 0,
    data: DataPosition | None = None,
    slots: dict[int, DataPosition] | None = None,
    keep_newer: bool = False,
) -> Path:
    """Write the stage whole into a new directory, then swap it in (see the module's docstring).
    With `keep_newer` (a swarm's replica), a checkpoint of a later step of this run is kept instead."""
    d = stage_dir(root, worker.index)
    root.mkdir(parents=True, exist_ok=True)
    _settle(root, worker.index)
    # Replicas of a stage may share one directory (a local swarm, a shared disk): one that fell behind
    # or was dropped from the swarm must not put its older state over the stage's newer checkpoint.
    have = load_manifest(root, worker.index) if keep_newer else None
    if have is not None and have.run == run and have.step > worker.step_count:
        raise NewerCheckpoint(
            f"{d} holds step {have.step}, later than this replica's step {worker.step_count}: kept as it is"
        )
    new, old = d.with_name(f"{d.name}.{os.getpid()}.new"), d.with_name(f"{d.name}.{os.getpid()}.old")
    new.mkdir()
    try:  # a failed write (a full disk) leaves the last good checkpoint as it was, and no leftovers
        _write(worker, new, run, samples, data, slots)
        fsync_tree(new)  # on disk before the rename makes it current
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    moved = False
    with contextlib.suppress(FileNotFoundError):  # another replica of the stage may be swapping too
        os.replace(d, old)
        moved = True
    try:
        os.replace(new, d)
    except OSError:
        shutil.rmtree(new, ignore_errors=True)
        if moved and not d.exists():  # our rename failed, not a racing replica's: put ours back
            os.replace(old, d)
            fsync_path(root)
            raise
        # else that replica's whole checkpoint is in place: the same weights, under sync
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)
    return d


def _write(
    worker: StageWorker,
    new: Path,
    run: str,
    samples: int,
    data: DataPosition | None,
    slots: dict[int, DataPosition] | None,
) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in worker.stage.state_dict().items()}
    save_file(state, str(new / "model.safetensors"))
    torch.save(worker.optimizer.state_dict(), new / "optimizer.pt")
    sub = worker.stage.subspace
    man = Manifest(
        run=run,
        stage=worker.index,
        layers=(worker.stage.layer_range.start, worker.stage.layer_range.stop),
        step=worker.step_count,
        samples=samples,
        fingerprint=sub.fingerprint if sub is not None else None,
        codec=worker.codec.name,
        data=data,
        slots=slots or {},
    )
    (new / "manifest.json").write_text(man.model_dump_json(indent=2))


def save_run_config(cfg: RunConfig, root: Path) -> Path:
    """Write cfg as DIR/run.json; every node writes the same config, so the last writer wins harmlessly."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / RUN_CONFIG
    _atomic(path, lambda p: p.write_text(cfg.model_dump_json(indent=2)))
    return path


def load_run_config(root: Path) -> RunConfig:
    path = root / RUN_CONFIG
    if not path.is_file():
        raise PmnodeError(
            f"{root} is not a pmnode checkpoint: {path} is missing; "
            f"run `pmnode local-swarm --checkpoint-dir {root}` first"
        )
    try:
        return RunConfig.model_validate_json(path.read_text())
    except ValidationError as e:
        raise ConfigError(f"invalid run config {path}:\n{format_validation_error(e)}") from e


def load_manifest(root: Path, stage: int) -> Manifest | None:
    if root.is_dir():
        _settle(root, stage)
    p = stage_dir(root, stage) / "manifest.json"
    return Manifest.model_validate_json(p.read_text()) if p.exists() else None


def load(worker: StageWorker, root: Path) -> Manifest:
    """Restore weights and optimizer state; refuses a checkpoint of another basis or layer range."""
    man = load_manifest(root, worker.index)
    if man is None:
        raise PmnodeError(f"no checkpoint for stage {worker.index} under {root}")
    sub = worker.stage.subspace
    fp = sub.fingerprint if sub is not None else None
    if man.fingerprint != fp:
        raise PmnodeError(f"checkpoint fingerprint {man.fingerprint} does not match this run's basis {fp}")
    if man.codec != worker.codec.name:
        raise PmnodeError(
            f"checkpoint was trained with codec {man.codec}; this stage uses {worker.codec.name}"
        )
    rng = worker.stage.layer_range
    if tuple(man.layers) != (rng.start, rng.stop):
        raise PmnodeError(f"checkpoint holds layers {man.layers}, this stage has {rng.start}..{rng.stop}")
    d = stage_dir(root, worker.index)
    worker.stage.load_state_dict(load_file(str(d / "model.safetensors"), device=str(worker.device)))
    worker.stage.project_()  # the invariant is re-imposed after every load
    worker.optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=worker.device))
    worker.step_count = man.step
    return man
