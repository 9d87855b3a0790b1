"""Whether this machine can hold the stage it was given, before a byte of it is allocated."""

from __future__ import annotations

import psutil
import torch

from pmnode.config import MachineConfig, RunConfig
from pmnode.core.sizing import human, precision_name, stage_sizes
from pmnode.errors import PmnodeError


def device_memory(machine: MachineConfig) -> tuple[int, str]:
    """Bytes this node may use and where the figure comes from: --memory-limit, the GPU's total
    memory, or the RAM available now."""
    if machine.memory_limit is not None:
        return machine.memory_limit, "--memory-limit"
    if machine.device.startswith("cuda"):
        index = torch.device(machine.device).index or 0
        return torch.cuda.get_device_properties(index).total_memory, f"{machine.device}'s memory"
    return psutil.virtual_memory().available, "the RAM available"


def check_fits(cfg: RunConfig, stage: int, machine: MachineConfig) -> None:
    """Raise one line if stage `stage` needs more memory than this machine has (pmnode.core.sizing,
    with its headroom), saying what would make it fit."""
    size = stage_sizes(cfg)[stage]
    have, source = device_memory(machine)
    precision = precision_name(machine.autocast_bf16, machine.optimizer_state)
    need = size.required(precision, machine.checkpoint_layers)
    if need <= have:
        return
    options = {
        "--checkpoint-layers": ("fp32", True),
        "--optimizer-state int8": ("int8-adam", machine.checkpoint_layers),
        "--optimizer-state int8 --checkpoint-layers": ("int8-adam", True),
        "--bf16 --optimizer-state int8 --checkpoint-layers": ("bf16+int8-adam", True),
    }
    fitting = [flags for flags, (p, ckpt) in options.items() if size.required(p, ckpt) <= have]
    hint = f"try {fitting[0]}, or " if fitting else ""
    raise PmnodeError(
        f"stage {stage} needs about {human(need)} ({precision}"
        f"{', checkpointed' if machine.checkpoint_layers else ''}; `coordinator inspect` shows why) but "
        f"{source} is {human(have)}: {hint}join a run with smaller stages"
    )
