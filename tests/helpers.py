"""What the in-process tests share (the multi-process ones share tests/launch.py): a two-stage config
small enough to step a StageWorker in milliseconds, and its inputs."""

from __future__ import annotations

import torch

from pmnode.config import RunConfig
from pmnode.core.codecs import Packet

# d_model 32 compressed to rank 4 at the boundary; the last layer uncompressed; 8-token windows.
WORKER_CFG = RunConfig.model_validate(
    {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16},
        "subspace": {"compression_rank": 4, "uncompressed_tail_layers": 1},
        "n_stages": 2,
        "train": {"seq_len": 8},
        "optim": {"warmup_steps": 0},
    }
)


def toks(seed: int) -> torch.Tensor:
    """A micro-batch of 2 windows of WORKER_CFG's 8 tokens, the same for the same seed."""
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))


def grad_packet(seed: int) -> Packet:
    """The gradient stage 1 sends back for `toks`: rank-4 coordinates at the boundary."""
    return Packet({"v": torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(seed))})
