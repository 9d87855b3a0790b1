"""Boundary codecs: what crosses a stage boundary, forward and backward.

A codec has a *space* and two *quantizers*:
    project(x, tok) -> z     residual (B, T, d) into the codec space (B, T, m), differentiable
    lift(z, tok)    -> x     back to the residual, differentiable
    fwd.pack(z) / fwd.unpack  wire form of activations
    bwd.pack(g) / bwd.unpack  wire form of dL/dz
For `subspace` the space is the k coefficients c = U^T (x - F[tok]), so the
gradient that travels back is dL/dc, k numbers per token. For the baselines
(`dense`, `int8`, `topk`) the space is the residual itself (m = d).

Upstream sends pack(project(x)); downstream treats unpack(...) as a leaf,
lifts it and runs its layers; after backward it sends pack(leaf.grad), and
upstream calls z.backward(unpack(...)). The single-process trainer hands the
same packets from one StageWorker to the next, so it sees exactly what a swarm
sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pmnode.core.subspace import Subspace
from pmnode.errors import ConfigError

_SCALE_DTYPE = torch.bfloat16  # fp32's range in 2 bytes: activation gradients can be ~1e-9


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every token id."""
    if vocab_size <= 2**8:
        return torch.uint8
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.int32


@dataclass
class Packet:
    """Named wire tensors; `nbytes` is exactly what their payload bytes cost."""

    tensors: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def on_host(self) -> Packet:
        """On the compute thread, before the packet leaves it: the copy from a GPU waits for the
        device there, never on the event loop (pmnode.net.wire only takes host tensors)."""
        return Packet({k: v.detach().cpu() for k, v in self.tensors.items()})


class Quantizer(Protocol):
    @property
    def dim(self) -> int: ...  # numbers per token before packing

    def pack(self, z: Tensor) -> dict[str, Tensor]: ...
    def unpack(self, p: dict[str, Tensor]) -> Tensor: ...
    def bytes_per_token(self) -> int: ...


@dataclass(frozen=True)
class FloatQ:
    dim: int
    dtype: torch.dtype = torch.float32

    def pack(self, z: Tensor) -> dict[str, Tensor]:
        return {"v": z.detach().to(self.dtype)}

    def unpack(self, p: dict[str, Tensor]) -> Tensor:
        return p["v"].to(torch.float32)

    def bytes_per_token(self) -> int:
        return self.dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Int8Q:
    """Uniform symmetric int8 per token, with a bf16 absmax scale."""

    dim: int

    def pack(self, z: Tensor) -> dict[str, Tensor]:
        z = z.detach().float()
        scale = (z.abs().amax(-1, keepdim=True) / 127.0).to(_SCALE_DTYPE)  # (B, T, 1)
        s = scale.float()
        q = torch.where(s > 0, z / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-127, 127)
        return {"q": q.to(torch.int8), "scale": scale}

    def unpack(self, p: dict[str, Tensor]) -> Tensor:
        return p["q"].to(torch.float32) * p["scale"].to(torch.float32)

    def bytes_per_token(self) -> int:
        return self.dim + 2


@dataclass(frozen=True)
class Int4Q:
    """Uniform symmetric 4-bit per token (levels -7..7), two per byte, with a bf16 absmax scale.

    At equal bytes it carries twice the rank of int8 and eight times that of fp32."""

    dim: int

    def pack(self, z: Tensor) -> dict[str, Tensor]:
        z = z.detach().float()
        scale = (z.abs().amax(-1, keepdim=True) / 7.0).to(_SCALE_DTYPE)
        s = scale.float()
        q = torch.where(s > 0, z / torch.where(s > 0, s, 1.0), 0.0).round().clamp(-7, 7).to(torch.int16) + 8
        if self.dim % 2:
            q = torch.cat([q, torch.full_like(q[..., :1], 8)], dim=-1)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)
        return {"q": packed, "scale": scale}

    def unpack(self, p: dict[str, Tensor]) -> Tensor:
        b = p["q"].to(torch.int16)
        q = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)[..., : self.dim] - 8
        return q.to(torch.float32) * p["scale"].to(torch.float32)

    def bytes_per_token(self) -> int:
        return (self.dim + 1) // 2 + 2


@dataclass(frozen=True)
class TopKQ:
    """The `count` largest-magnitude entries per token: bf16 values plus their indices."""

    dim: int
    count: int

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.uint8 if self.dim <= 2**8 else torch.int16 if self.dim <= 2**15 else torch.int32

    def pack(self, z: Tensor) -> dict[str, Tensor]:
        z = z.detach().float()
        idx = z.abs().topk(self.count, dim=-1, sorted=False).indices  # (B, T, count)
        return {"v": z.gather(-1, idx).to(torch.bfloat16), "i": idx.to(self.index_dtype)}

    def unpack(self, p: dict[str, Tensor]) -> Tensor:
        v = p["v"].to(torch.float32)
        out = torch.zeros(*v.shape[:-1], self.dim, dtype=torch.float32, device=v.device)
        return out.scatter_(-1, p["i"].long(), v)

    def bytes_per_token(self) -> int:
        return self.count * (2 + torch.empty((), dtype=self.index_dtype).element_size())


class Codec:
    """One boundary codec. Build with `make_codec(spec, ...)`."""

    def __init__(
        self, name: str, fwd: Quantizer, bwd: Quantizer, vocab_size: int, subspace: Subspace | None = None
    ):
        self.name, self.fwd, self.bwd, self.subspace = name, fwd, bwd, subspace
        self.token_dtype = token_dtype(vocab_size)

    @property
    def sends_tokens(self) -> bool:
        """Only the subspace codec needs token ids downstream, to add back F[tok]."""
        return self.subspace is not None

    def project(self, x: Tensor, tokens: Tensor | None) -> Tensor:
        if self.subspace is None:
            return x
        if tokens is None:
            raise ValueError("the subspace codec needs token ids")
        return self.subspace.encode(x, tokens)

    def lift(self, z: Tensor, tokens: Tensor | None) -> Tensor:
        if self.subspace is None:
            return z
        if tokens is None:
            raise ValueError("the subspace codec needs token ids")
        return self.subspace.decode(z, tokens)

    def pack_activation(self, z: Tensor, tokens: Tensor | None) -> Packet:
        t = self.fwd.pack(z)
        if self.sends_tokens:
            assert tokens is not None
            t["tokens"] = tokens.to(self.token_dtype)
        return Packet(t)

    def unpack_activation(self, p: Packet) -> Tensor:
        return self.fwd.unpack(p.tensors)

    def pack_gradient(self, g: Tensor) -> Packet:
        return Packet(self.bwd.pack(g))

    def unpack_gradient(self, p: Packet) -> Tensor:
        return self.bwd.unpack(p.tensors)

    def bytes_per_token_forward(self) -> int:
        tok = torch.empty((), dtype=self.token_dtype).element_size() if self.sends_tokens else 0
        return self.fwd.bytes_per_token() + tok

    def bytes_per_token_backward(self) -> int:
        return self.bwd.bytes_per_token()


_FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def quantizer_for(spec: str, *, d_model: int, rank: int | None = None) -> Quantizer:
    """The wire format of one token's vector for a codec spec: dense[:fp32|bf16|fp16], int8,
    topk[:count], subspace[:fp32|fp16|bf16|int8|int4] (of `rank` coefficients)."""
    kind, _, arg = spec.partition(":")
    if kind == "subspace":
        if rank is None:
            raise ConfigError("codec 'subspace' needs subspace.enabled: true in the config")
        if arg in ("", *_FLOATS):
            return FloatQ(rank, _FLOATS[arg or "fp32"])
        if arg == "int8":
            return Int8Q(rank)
        if arg == "int4":
            return Int4Q(rank)
        raise ConfigError(f"unknown subspace precision {arg!r}: use fp32, fp16, bf16, int8 or int4")
    if kind == "dense":
        if arg not in ("", *_FLOATS):
            raise ConfigError(f"unknown dense precision {arg!r}: use fp32, fp16 or bf16")
        return FloatQ(d_model, _FLOATS[arg or "fp32"])
    if kind == "int8" and not arg:
        return Int8Q(d_model)
    if kind == "topk":
        count = int(arg) if arg.isdigit() else max(1, d_model // 16)
        if not 1 <= count <= d_model:
            raise ConfigError(f"topk count must be in 1..{d_model}, got {arg}")
        return TopKQ(d_model, count)
    raise ConfigError(f"unknown codec {spec!r}: use dense[:bf16], int8, topk:N or subspace[:int8|int4]")


def wire_bytes(spec: str, *, d_model: int, vocab_size: int, rank: int | None = None) -> tuple[int, int]:
    """(forward, backward) bytes per token of one boundary, from the formats alone: no basis or
    token table is built, so any model size is cheap to price. Forward adds the token ids the
    subspace codec sends."""
    q = quantizer_for(spec, d_model=d_model, rank=rank).bytes_per_token()
    tok = torch.empty((), dtype=token_dtype(vocab_size)).element_size() if spec.startswith("subspace") else 0
    return q + tok, q


def make_codec(spec: str, *, d_model: int, vocab_size: int, subspace: Subspace | None = None) -> Codec:
    """spec: dense[:fp32|bf16|fp16], int8, topk[:count], subspace[:fp32|fp16|bf16|int8|int4]."""
    if spec.startswith("subspace"):
        if subspace is None:
            raise ConfigError("codec 'subspace' needs subspace.enabled: true in the config")
        q = quantizer_for(spec, d_model=d_model, rank=subspace.rank)
        return Codec(spec, q, q, vocab_size, subspace)
    q = quantizer_for(spec, d_model=d_model)
    if subspace is not None:
        raise ConfigError(f"codec {spec!r} sends the full residual; set subspace.enabled: false")
    return Codec(spec, q, q, vocab_size)
