"""Compressors for a replica's pseudo-gradient: what one outer round sends, and checking what arrives.

Three ways a tensor travels (`replica_sync.compressor`; tensors under `exact_below` elements always
go the exact way):

- **exact**: fp32, bit for bit.
- **topk** (SparseLoCo-like): the tensor is cut into chunks of C values; each chunk sends its
  k = ceil(fraction·C) largest magnitudes, each as one code of log2(C) index bits + b value bits (a
  sign and b-1 magnitude bits between the chunk's smallest and largest kept magnitude, two fp16
  scalars per chunk). The codes are bit-packed, so the bytes counted are the bytes sent.
- **lowrank** (PowerSGD-like): a matrix M (m×n) sends P (m×r) and Q (n×r) in fp16, M ≈ P·Qᵀ, with P
  from one power iteration warm-started at the previous round's Q (the first Q from a seed).

Decoding checks everything a dishonest replica could get wrong: byte counts, shapes, finiteness,
indices inside the tensor. `Malformed` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pmnode.config.replica_sync import ReplicaSyncConfig


class Malformed(ValueError):
    """A compressed tensor that cannot be what the sender claims (bad size, shape, value or index)."""


@dataclass
class Compressed:
    """One tensor's share of a round: `kind` says how the parts read."""

    kind: str  # "exact" | "topk" | "lowrank"
    parts: list[Tensor]  # exact: [fp32]; topk: [uint8 codes, fp16 (chunks, 2) scales]; lowrank: [P, Q]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)


def kind_for(shape: tuple[int, ...], cfg: ReplicaSyncConfig) -> str:
    numel = math.prod(shape)
    if cfg.compressor == "none" or numel < cfg.exact_below:
        return "exact"
    if cfg.compressor == "powersgd":
        # a factorisation only saves bytes when (m + n)·r < m·n; vectors and thin matrices go top-k
        if len(shape) == 2 and (shape[0] + shape[1]) * cfg.powersgd_rank < numel:
            return "lowrank"
        return "exact"
    return "topk"


def _topk_shape(numel: int, cfg: ReplicaSyncConfig) -> tuple[int, int, int]:
    """(chunks, kept per chunk, bits per code)."""
    chunks = -(-numel // cfg.topk_chunk)
    keep = max(1, math.ceil(cfg.topk_fraction * cfg.topk_chunk))
    return chunks, keep, int(math.log2(cfg.topk_chunk)) + cfg.topk_bits


def compressed_bytes(shape: tuple[int, ...], cfg: ReplicaSyncConfig) -> int:
    """Bytes one replica sends for a tensor of this shape in one round (exact, by the formats above)."""
    kind, numel = kind_for(shape, cfg), math.prod(shape)
    if kind == "exact":
        return 4 * numel
    if kind == "lowrank":
        return 2 * (shape[0] + shape[1]) * cfg.powersgd_rank
    chunks, keep, bits = _topk_shape(numel, cfg)
    return -(-chunks * keep * bits // 8) + 4 * chunks


def round_bytes(shapes: list[tuple[int, ...]], cfg: ReplicaSyncConfig) -> int:
    return sum(compressed_bytes(s, cfg) for s in shapes)


# ---- bit packing: n codes of w bits each, little-endian, into ceil(n·w/8) bytes


def pack_bits(codes: Tensor, width: int) -> Tensor:
    shifts = torch.arange(width, device=codes.device)
    bits = ((codes.reshape(-1, 1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # (n·w,)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).reshape(-1, 8)
    return (bits << torch.arange(8, device=codes.device, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, width: int, n: int) -> Tensor:
    bits = (packed.reshape(-1, 1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    bits = bits.reshape(-1)[: n * width].reshape(n, width).to(torch.int64)
    return (bits << torch.arange(width, device=packed.device)).sum(1)


# ---- the three formats


def compress(t: Tensor, cfg: ReplicaSyncConfig, q_prev: Tensor | None = None) -> Compressed:
    kind = kind_for(tuple(t.shape), cfg)
    if kind == "exact":
        return Compressed("exact", [t.detach().float().clone()])
    if kind == "lowrank":
        assert q_prev is not None, "lowrank needs the previous round's Q"
        m = t.detach().float()
        p = torch.linalg.qr(m @ q_prev.float().to(m.device)).Q  # (m, r), orthonormal columns
        q = m.T @ p  # (n, r): M ≈ P Qᵀ
        return Compressed("lowrank", [p.half(), q.half()])
    chunks, keep, bits = _topk_shape(t.numel(), cfg)
    flat = torch.nn.functional.pad(t.detach().float().reshape(-1), (0, chunks * cfg.topk_chunk - t.numel()))
    flat = flat.reshape(chunks, cfg.topk_chunk)
    pad = torch.zeros_like(flat, dtype=torch.bool).reshape(-1)
    pad[t.numel() :] = True  # the last chunk's padding is chosen last, and only if it must be
    mag, idx = flat.abs().masked_fill(pad.reshape(flat.shape), -1.0).topk(keep, dim=1)  # (chunks, keep)
    mag = mag.clamp_min(0)
    sign = flat.gather(1, idx) < 0
    lo, hi = mag.min(1, keepdim=True).values, mag.max(1, keepdim=True).values
    scales = torch.cat([lo, hi], 1).half()
    lo, hi = scales[:, :1].float(), scales[:, 1:].float()  # quantise against what the receiver reads
    levels = (1 << (cfg.topk_bits - 1)) - 1
    q = ((mag - lo) / (hi - lo).clamp_min(1e-30) * levels).round().clamp(0, levels).to(torch.int64)
    value = (q << 1) | sign.to(torch.int64)  # b bits: magnitude level, then the sign
    codes = idx | (value << int(math.log2(cfg.topk_chunk)))
    return Compressed("topk", [pack_bits(codes, bits), scales])


def decompress(c: Compressed, shape: tuple[int, ...], cfg: ReplicaSyncConfig) -> Tensor:
    """The tensor a compressed share stands for; raises Malformed for anything a peer got wrong."""
    expected = kind_for(shape, cfg)
    if c.kind != expected:
        raise Malformed(f"{c.kind} where {expected} was due")
    if c.nbytes() != compressed_bytes(shape, cfg):
        raise Malformed(f"{c.nbytes()} bytes where {compressed_bytes(shape, cfg)} were due")
    for p in c.parts:
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise Malformed("non-finite values")
    if c.kind == "exact":
        (t,) = c.parts
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise Malformed(f"exact tensor {t.dtype} {tuple(t.shape)} where float32 {shape} was due")
        return t
    if c.kind == "lowrank":
        p, q = c.parts
        if tuple(p.shape) != (shape[0], cfg.powersgd_rank) or tuple(q.shape) != (shape[1], cfg.powersgd_rank):
            raise Malformed(f"factors {tuple(p.shape)} {tuple(q.shape)} do not make {shape}")
        return p.float() @ q.float().T
    packed, scales = c.parts
    numel = math.prod(shape)
    chunks, keep, bits = _topk_shape(numel, cfg)
    if packed.dtype != torch.uint8 or scales.dtype != torch.float16 or tuple(scales.shape) != (chunks, 2):
        raise Malformed("top-k parts of the wrong type or shape")
    index_bits = int(math.log2(cfg.topk_chunk))
    codes = unpack_bits(packed, bits, chunks * keep).reshape(chunks, keep)
    idx, value = codes & (cfg.topk_chunk - 1), codes >> index_bits
    # the last chunk is padded: an index into the padding points outside the tensor
    last = numel - (chunks - 1) * cfg.topk_chunk  # real values in the last chunk
    if last >= keep and bool((idx[-1] >= last).any()):
        raise Malformed("an index outside the tensor")
    lo, hi = scales[:, :1].float(), scales[:, 1:].float()
    if bool((lo < 0).any()) or bool((hi < lo).any()):
        raise Malformed("chunk scales out of order")
    levels = (1 << (cfg.topk_bits - 1)) - 1
    mag = lo + (hi - lo) * (value >> 1).float() / levels
    vals = torch.where((value & 1).bool(), -mag, mag)
    out = torch.zeros(chunks, cfg.topk_chunk, device=packed.device)
    out.scatter_(1, idx, vals)  # repeated indices from a dishonest peer overwrite, never grow the tensor
    return out.reshape(-1)[:numel].reshape(shape)


def initial_q(shape: tuple[int, ...], rank: int, seed: int) -> Tensor:
    """The first round's Q for a matrix: the same on every replica (from the run's seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[1], rank, generator=g)
