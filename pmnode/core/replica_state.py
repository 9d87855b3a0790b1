"""A stage's replica state as named tensors: what a new replica copies (weights, optimizer, step).

`state_tensors` flattens the stage's state_dict and the optimizer's into one dict of tensors plus
a few scalars (the optimizer's param groups as JSON, the step), the form pmnode.net.bulk moves in
chunks; `load_state_tensors` puts them back. The bytes are copied exactly, so a copy is
bit-identical to its source.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from pmnode.core.worker import StageWorker
from pmnode.errors import PmnodeError

_MODEL, _OPTIM = "model/", "optim/"


def state_tensors(worker: StageWorker) -> tuple[dict[str, Tensor], dict[str, int | str]]:
    """Compute thread: the stage's weights and optimizer state (views, no copy), and the scalars."""
    tensors = {_MODEL + k: v.detach() for k, v in worker.stage.state_dict().items()}
    opt = worker.optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{_OPTIM}{idx}/{key}"] = value.detach()
            else:
                scalars[f"{idx}/{key}"] = value
    meta: dict[str, int | str] = {
        "step": worker.step_count,
        "param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    return tensors, meta


def max_state_bytes(worker: StageWorker) -> int:
    """The most bytes a replica's state copy of this stage may announce: its weights, two optimizer
    moments, what an outer loop adds (an anchor, error feedback) and room for alignment and scalars.
    A sender's manifest above it is refused before the receiver allocates anything (net.bulk)."""
    weights = sum(t.numel() * t.element_size() for t in worker.stage.state_dict().values())
    return 8 * weights + 2**26  # fp32 moments of bf16 weights are 4x alone: leave room


def load_state_tensors(worker: StageWorker, tensors: dict[str, Tensor], meta: dict[str, int | str]) -> None:
    """Compute thread: become the replica these are of; gradients accumulated here are void.
    Nothing is loaded unless every float in the copy is finite (bulk chunks skip the wire's check)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PmnodeError(f"replica state refused: {name} holds NaN or infinite values")
    model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith(_OPTIM):
            idx, key = name[len(_OPTIM) :].split("/", 1)
            state.setdefault(int(idx), {})[key] = t
    try:
        for name, value in json.loads(str(meta["optim_scalars"])).items():
            idx, key = name.split("/", 1)
            state.setdefault(int(idx), {})[key] = value
        groups = json.loads(str(meta["param_groups"]))
        step = int(meta["step"])
    except (KeyError, ValueError) as e:
        raise PmnodeError(f"replica state without its optimizer layout or step: {e}") from e
    worker.stage.load_state_dict(model)  # copies into the live weights, on their device
    worker.optimizer.load_state_dict({"state": state, "param_groups": groups})  # copies too
    worker.step_count = step
    worker.optimizer.zero_grad(set_to_none=True)
    worker.samples_ready = 0
    worker.accumulated = {}
    worker.correction.meter.forget()
