"""What one machine chooses for itself: command-line flags, never part of a RunConfig."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pmnode.config.sections import _Strict


class MachineConfig(_Strict):
    """What one machine chooses for itself (command-line flags, never part of a RunConfig)."""

    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N.")
    threads: int | None = Field(None, ge=1, description="torch threads; None keeps torch's default.")
    autocast_bf16: bool = Field(False, description="Run the layers under bf16 autocast (for GPUs).")
    optimizer_state: Literal["fp32", "int8"] = Field(
        "fp32", description="AdamW's moments in fp32 (8 B/parameter) or 8-bit blocks (2 B, core.adam8)."
    )
    checkpoint_layers: bool = Field(
        False, description="Recompute each layer's activations in the backward instead of keeping them."
    )
    fused_adam: bool | None = Field(None, description="torch's fused AdamW kernel; None: on for CUDA.")
    memory_limit: int | None = Field(
        None, ge=1, description="Bytes this node may use for its stage; None: the device's memory."
    )
    data: str | None = Field(None, description="This machine's copy of the corpus; None: data.source.")
