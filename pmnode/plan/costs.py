"""Per-stage costs of a run config for `pmnode plan` and the simulator: parameters, training FLOPs,
boundary bytes per token and memory.

A thin view of pmnode.core.sizing, the one model of a stage's size (what `join` checks a machine
against and `coordinator inspect` prints), so the plan counts what the node builds: reparametrised
writes at k x n, the frozen basis and token table apart, the codec's lift and projection.
"""

from __future__ import annotations

from pydantic import BaseModel

from pmnode.config import RunConfig
from pmnode.core.codecs import wire_bytes
from pmnode.core.sizing import stage_sizes
from pmnode.core.train import config_for
from pmnode.errors import ConfigError

PLAN_PRECISION = "bf16"  # what a GPU volunteer runs: bf16 autocast, fp32 weights and Adam moments


class StageCost(BaseModel):
    stage: int
    layers: int
    params: int  # trainable
    flops_fwd_per_token: float
    flops_bwd_per_token: float
    bytes_fwd_per_token: int  # sent to the next stage (0 at the tail)
    bytes_bwd_per_token: int  # sent back to the previous stage (0 at the head)
    memory_bytes: int  # PLAN_PRECISION: weights, gradients, Adam, U and F, one micro-batch, headroom

    @property
    def flops_per_token(self) -> float:
        return self.flops_fwd_per_token + self.flops_bwd_per_token


def codec_bytes(cfg: RunConfig, spec: str) -> tuple[int, int, int | None]:
    """(forward, backward) bytes per token of one boundary, and k for a subspace codec.

    'subspace[:fp16|bf16|int8|int4][@k]' (k defaults to the config's), 'dense[:bf16|fp16]', 'int8',
    'topk:N'."""
    run_cfg, codec = _with_codec(cfg, spec)
    k = run_cfg.rank if codec.startswith("subspace") else None
    m = run_cfg.model
    fwd, bwd = wire_bytes(codec, d_model=m.d_model, vocab_size=m.vocab_size, rank=k)
    return fwd, bwd, k


def _with_codec(cfg: RunConfig, spec: str) -> tuple[RunConfig, str]:
    codec, _, rank = spec.partition("@")
    if rank and not codec.startswith("subspace"):
        raise ConfigError(f"codec {spec!r}: only subspace takes @k")
    if rank and not (rank.isdigit() and 1 <= int(rank) <= cfg.model.d_model):
        raise ConfigError(f"codec {spec!r}: k must be in 1..{cfg.model.d_model}")
    return config_for(cfg, spec)


def stage_costs(cfg: RunConfig, codec: str) -> list[StageCost]:
    run_cfg, _ = _with_codec(cfg, codec)
    _, bwd, _ = codec_bytes(cfg, codec)  # what a stage sends back: sizing counts it at the boundary after
    return [
        StageCost(
            stage=s.stage,
            layers=s.layers[1] - s.layers[0],
            params=s.params_trainable,
            flops_fwd_per_token=float(s.flops_per_token_fwd),
            flops_bwd_per_token=float(s.flops_per_token_bwd),
            bytes_fwd_per_token=s.bytes_per_token_fwd,
            bytes_bwd_per_token=bwd if s.stage > 0 else 0,
            memory_bytes=s.required(PLAN_PRECISION),
        )
        for s in stage_sizes(run_cfg)
    ]
