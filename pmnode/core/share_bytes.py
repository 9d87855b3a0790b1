"""One replica's share of an outer round as one flat byte buffer, and back.

A share is a compressed tensor per parameter (pmnode.core.compress), each of one to two parts. The
receiver knows every part's dtype and shape from the stage's parameter shapes and the run's
replica_sync settings alone, so nothing about the layout travels: the buffer is the parts' bytes
back to back, exactly `round_bytes(shapes, cfg)` long. A buffer of any other length is refused
before a byte of it is interpreted, and a stage with many parameters still travels as one tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.core.compress import Compressed, Malformed, _topk_shape, kind_for, round_bytes


def layout(shape: tuple[int, ...], cfg: ReplicaSyncConfig) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The parts a tensor of this shape travels as: (dtype, shape) each, in order."""
    kind = kind_for(shape, cfg)
    if kind == "exact":
        return [(torch.float32, shape)]
    if kind == "lowrank":
        r = cfg.powersgd_rank
        return [(torch.float16, (shape[0], r)), (torch.float16, (shape[1], r))]
    chunks, keep, bits = _topk_shape(math.prod(shape), cfg)
    return [(torch.uint8, (-(-chunks * keep * bits // 8),)), (torch.float16, (chunks, 2))]


def pack_share(tensors: list[Compressed]) -> Tensor:
    """Compute thread: the parts' bytes, back to back, as one uint8 tensor on the host."""
    flat = [p.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for c in tensors for p in c.parts]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)


def unpack_share(buf: Tensor, shapes: list[tuple[int, ...]], cfg: ReplicaSyncConfig) -> list[Compressed]:
    """Compute thread: the compressed tensors a buffer holds; Malformed if it is not exactly the
    size the stage's shapes give (its values are checked later, by compress.decompress)."""
    want = round_bytes(shapes, cfg)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
        raise Malformed(f"a share of {buf.numel()} bytes where {want} were due")
    out, at = [], 0
    for shape in shapes:
        parts = []
        for dtype, part_shape in layout(shape, cfg):
            n = math.prod(part_shape) * torch.empty((), dtype=dtype).element_size()
            # a copy: a part may start at an odd offset, and a view of another dtype must be aligned
            parts.append(buf[at : at + n].clone().view(dtype).reshape(part_shape))
            at += n
        out.append(Compressed(kind_for(shape, cfg), parts))
    return out
