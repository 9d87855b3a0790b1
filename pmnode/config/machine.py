"""What one machine chooses for itself: command-line flags, never part of a RunConfig."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pmnode.config.sections import _Strict


class MachineConfig(_Strict):
    """What one machine chooses for itself (command-line flags, never part of a RunConfig)."""

    device: str = Field(
        "cpu", description="torch device: cpu, cuda, cuda:N (the command line's auto: CUDA if any)."
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads for this node (unset: torch's choice)."
    )
    autocast_bf16: bool = Field(False, description="bf16 autocast for this node's layers (for GPUs).")
    optimizer_state: Literal["fp32", "int8"] = Field(
        "fp32", description="AdamW's moments: fp32 (8 B/parameter) or int8 (2 B, 8-bit blocks, core.adam8)."
    )
    checkpoint_layers: bool = Field(
        False,
        description="Recompute each layer in the backward instead of keeping its activations: less memory.",
    )
    fused_adam: bool | None = Field(None, description="torch's fused AdamW kernel (unset: on for CUDA).")
    memory_limit: int | None = Field(
        None,
        ge=1,
        description="Memory this node may use for its stage, e.g. 24GB (unset: the GPU's, or the free RAM).",
    )
    data: str | None = Field(
        None,
        description="This machine's copy of the corpus: a prepared data dir, corpus file/dir or 'stdlib' "
        "(unset: data.source).",
    )
