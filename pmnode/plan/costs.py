"""Per-stage costs of a run config: parameters, training FLOPs and boundary bytes per token.

The one place `pmnode plan` and the simulator get a stage's size from (`stage_costs`), kept narrow so
that it can be pointed at another sizing module without touching its callers.

FLOPs per token follow the usual count for a LLaMA block: 2 per weight forward, 4 backward, plus the
causal attention matmuls (QKᵀ and AV, each 2·(T/2)·d forward, averaged over positions). The head's
embedding is a lookup (no FLOPs); the tail adds the final norm's nothing and the LM head's d·V.
The subspace reparametrisation (W = U·Z) changes a layer's matmul count by O(d·k) and is ignored.
Bytes per token come from the codec's own quantizers, so they match what the wire carries.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from pmnode.config import RunConfig
from pmnode.core.codecs import FloatQ, Int8Q, make_codec, token_dtype
from pmnode.core.split import split_layers
from pmnode.core.train import parse_spec
from pmnode.errors import ConfigError

_FLOAT = {"": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StageCost(BaseModel):
    stage: int
    layers: int
    params: int
    flops_fwd_per_token: float
    flops_bwd_per_token: float
    bytes_fwd_per_token: int  # sent to the next stage (0 at the tail)
    bytes_bwd_per_token: int  # sent back to the previous stage (0 at the head)

    @property
    def flops_per_token(self) -> float:
        return self.flops_fwd_per_token + self.flops_bwd_per_token


def layer_params(cfg: RunConfig) -> int:
    m = cfg.model
    kv = m.kv_heads * (m.d_model // m.n_heads)
    return 2 * m.d_model * m.d_model + 2 * m.d_model * kv + 3 * m.d_model * m.hidden + 2 * m.d_model


def codec_bytes(cfg: RunConfig, spec: str) -> tuple[int, int, int | None]:
    """(forward, backward) bytes per token of one boundary, and k for a subspace codec.

    'subspace[:fp16|bf16|int8][@k]' (k defaults to the config's), 'dense[:bf16|fp16]', 'int8', 'topk:N'.
    """
    codec, rank = parse_spec(spec)
    kind, _, arg = codec.partition(":")
    m = cfg.model
    if kind != "subspace":
        if rank is not None:
            raise ConfigError(f"codec {spec!r}: only subspace takes @k")
        c = make_codec(codec, d_model=m.d_model, vocab_size=m.vocab_size)
        return c.bytes_per_token_forward(), c.bytes_per_token_backward(), None
    k = rank or cfg.subspace.rank(m.d_model)
    if not 1 <= k <= m.d_model:
        raise ConfigError(f"codec {spec!r}: k must be in 1..{m.d_model}")
    if arg == "int8":
        q: FloatQ | Int8Q = Int8Q(k)
    elif arg in _FLOAT:
        q = FloatQ(k, _FLOAT[arg])
    else:
        raise ConfigError(f"unknown subspace precision {arg!r}: use fp32, fp16, bf16 or int8")
    tok = torch.empty((), dtype=token_dtype(m.vocab_size)).element_size()
    return q.bytes_per_token() + tok, q.bytes_per_token(), k


def stage_costs(cfg: RunConfig, codec: str) -> list[StageCost]:
    m, t = cfg.model, cfg.train
    fwd_b, bwd_b, _ = codec_bytes(cfg, codec)
    ranges = split_layers(m.n_layers, cfg.n_stages, cfg.stage_layers)
    per_layer = layer_params(cfg)
    attn_fwd = 2 * t.seq_len * m.d_model  # QKᵀ and AV over T/2 keys on average, 2 FLOPs per MAC
    out = []
    for s, r in enumerate(ranges):
        layers = len(r)
        params = layers * per_layer
        fwd = 2 * params + layers * attn_fwd
        bwd = 4 * params + 2 * layers * attn_fwd
        if s == 0:
            params += m.vocab_size * m.d_model  # the embedding: a lookup forward, a scatter backward
        if s == len(ranges) - 1:
            params += m.vocab_size * m.d_model + m.d_model
            fwd += 2 * m.d_model * m.vocab_size
            bwd += 4 * m.d_model * m.vocab_size
        out.append(
            StageCost(
                stage=s,
                layers=layers,
                params=params,
                flops_fwd_per_token=float(fwd),
                flops_bwd_per_token=float(bwd),
                bytes_fwd_per_token=fwd_b if s < len(ranges) - 1 else 0,
                bytes_bwd_per_token=bwd_b if s > 0 else 0,
            )
        )
    return out
