"""A boundary inside one process, for tests of the codecs' math: what the next stage rebuilds, with
the backward compressed the same way (the swarm does this across processes with real packets)."""

from __future__ import annotations

import torch
from torch import Tensor

from pmnode.core.codecs import Codec


class _WireRoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codec: Codec) -> Tensor:  # type: ignore[override]
        ctx.codec = codec
        return codec.fwd.unpack(codec.fwd.pack(z))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.codec.bwd.unpack(ctx.codec.bwd.pack(g)), None


def roundtrip(codec: Codec, x: Tensor, tokens: Tensor | None) -> Tensor:
    """x as the next stage rebuilds it, with the backward compressed the same way."""
    return codec.lift(_WireRoundTrip.apply(codec.project(x, tokens), codec), tokens)
