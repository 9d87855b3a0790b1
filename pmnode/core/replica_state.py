"""A stage's replica state as named tensors: what a new replica copies (weights, optimizer, step).

`state_tensors` flattens the stage's state_dict and the optimizer's into one dict of tensors plus
a `StateMeta` (the step, the optimizer's param groups and non-tensor state), the form pmnode.net.bulk
moves in chunks; `load_state_tensors` puts them back. The bytes are copied exactly, so a copy is
bit-identical to its source.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pmnode.core.snapshot_meta import SnapshotMeta, StateMeta, Value
from pmnode.core.worker import StageWorker
from pmnode.errors import PmnodeError

_MODEL, _OPTIM = "model/", "optim/"


def _plain(value: Any) -> Value:
    """A param group's or optimizer state's value as it survives JSON: tuples (AdamW's betas) as lists."""
    return list(value) if isinstance(value, (tuple, list)) else value


def state_tensors(worker: StageWorker) -> tuple[dict[str, Tensor], StateMeta]:
    """Compute thread: the stage's weights and optimizer state (views, no copy), and the rest."""
    tensors = {_MODEL + k: v.detach() for k, v in worker.stage.state_dict().items()}
    opt = worker.optimizer.state_dict()
    scalars: dict[str, Value] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIM}{idx}/{key}"] = value.detach()
            else:
                scalars[f"{idx}/{key}"] = _plain(value)
    groups = [{k: _plain(v) for k, v in g.items()} for g in opt["param_groups"]]
    return tensors, StateMeta(step=worker.step_count, param_groups=groups, optim_scalars=scalars)


def max_state_bytes(worker: StageWorker) -> int:
    """The most bytes a replica's state copy of this stage may announce: its weights, two optimizer
    moments, what an outer loop adds (an anchor, error feedback) and room for alignment and scalars.
    A sender's manifest above it is refused before the receiver allocates anything (net.bulk)."""
    weights = sum(t.numel() * t.element_size() for t in worker.stage.state_dict().values())
    return 8 * weights + 2**26  # fp32 moments of bf16 weights are 4x alone: leave room


_PER_WEIGHT = ("exp_avg", "exp_avg_sq")  # AdamW's moments: the weight's shape (8-bit ones pad blocks)
_PADDING = 4096  # entries an 8-bit optimizer's blocks may add to a weight's


def check_state(
    worker: StageWorker, tensors: dict[str, Tensor], meta: SnapshotMeta, step: int | None = None
) -> StateMeta:
    """A copy must be of this stage as it is laid out here, finite, and (`step`) of the step asked for;
    PmnodeError otherwise, before anything is loaded: a sender is a certified replica, not a trusted one
    (torch's load_state_dict would copy the tensors that fit before it complains about one that does not).
    Returns the copy's meta as a state's."""
    if not isinstance(meta, StateMeta):
        raise PmnodeError(f"replica state without its optimizer layout: a {type(meta).__name__}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PmnodeError(f"replica state refused: {name} holds NaN or infinite values")
    ours = {_MODEL + k: v for k, v in worker.stage.state_dict().items()}
    theirs = {k: v for k, v in tensors.items() if k.startswith(_MODEL)}
    if theirs.keys() != ours.keys():
        odd = sorted(theirs.keys() ^ ours.keys())[:3]
        raise PmnodeError(f"replica state refused: its weights are not this stage's ({odd})")
    for name, t in theirs.items():
        if t.shape != ours[name].shape or t.dtype != ours[name].dtype:
            raise PmnodeError(f"replica state refused: {name} is {t.dtype} {tuple(t.shape)}")
    params = [p for g in worker.optimizer.param_groups for p in g["params"]]
    own = worker.optimizer.state_dict()["state"]
    for name, t in tensors.items():
        if not name.startswith(_OPTIM):
            continue
        idx, key = name[len(_OPTIM) :].split("/", 1)
        if not idx.isdigit() or int(idx) >= len(params):
            raise PmnodeError(f"replica state refused: optimizer state {name} of no weight here")
        mine = own.get(int(idx), {}).get(key)
        p = params[int(idx)]
        if isinstance(mine, Tensor):
            bad = t.shape != mine.shape or t.dtype != mine.dtype
        else:  # this replica has not stepped yet: what every optimizer here keeps per weight
            bad = t.numel() > p.numel() + _PADDING or (key in _PER_WEIGHT and t.shape != p.shape)
        if bad:
            raise PmnodeError(f"replica state refused: optimizer state {name} is {t.dtype} {tuple(t.shape)}")
    if step is not None and meta.step != step:
        raise PmnodeError(f"replica state refused: of step {meta.step}, not {step}")
    return meta


def load_state_tensors(
    worker: StageWorker, tensors: dict[str, Tensor], meta: SnapshotMeta, step: int | None = None
) -> None:
    """Compute thread: become the replica these are of; gradients accumulated here are void.
    Nothing is loaded unless the copy passes `check_state` (bulk chunks skip the wire's checks)."""
    state_meta = check_state(worker, tensors, meta, step)
    model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith(_OPTIM):
            idx, key = name[len(_OPTIM) :].split("/", 1)
            state.setdefault(int(idx), {})[key] = t
    for name, value in state_meta.optim_scalars.items():
        idx, _, key = name.partition("/")
        if not idx.isdigit() or not key:
            raise PmnodeError(f"replica state refused: optimizer scalar {name[:40]!r} of no weight")
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g) for g in state_meta.param_groups]
    worker.stage.load_state_dict(model)  # copies into the live weights, on their device
    worker.optimizer.load_state_dict({"state": state, "param_groups": groups})  # copies too
    worker.step_count = state_meta.step
    worker.optimizer.zero_grad(set_to_none=True)
    worker.samples_ready = 0
    worker.accumulated = {}
    worker.correction.meter.forget()
