"""The run config's replica_sync section: how the replicas of one stage stay one model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pmnode.config.sections import _Strict
from pmnode.errors import ConfigError


class ReplicaSyncConfig(_Strict):
    """How the replicas of one stage keep one set of weights (pmnode.core.outer, pmnode.core.compress).

    step: today's paths, exact for small stages (sync: the summed gradient every step; async: every
    parameter averaged in fp16 every average_period seconds). outer: an outer loop in the manner of
    DiLoCo: inner_steps local steps on each replica's own micro-batches, then one outer step on the
    averaged pseudo-gradient (anchor - weights), which travels compressed with error feedback."""

    method: Literal["step", "outer", "grads"] = Field(
        "step",
        description="step: exchange every step (exact, LAN-sized traffic); outer: DiLoCo rounds; grads "
        "(sync schedule): every step each replica's gradient sums travel compressed as `compressor` says, "
        "with error feedback, and every replica steps its own optimizer on the same decoded total (one "
        "model; Adam sees the whole batch).",
    )
    inner_steps: int = Field(
        4,
        ge=1,
        description="outer: local optimizer steps between two rounds (H; `pmnode plan` recommends one).",
    )
    compressor: Literal["none", "topk", "powersgd"] = Field(
        "topk",
        description="outer: how a pseudo-gradient travels. none: fp32, exact; topk: the largest "
        "topk_fraction of each chunk of topk_chunk values, quantised to topk_bits (SparseLoCo-like); "
        "powersgd: a rank-powersgd_rank factorisation of each matrix (PowerSGD-like).",
    )
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: fraction of each chunk sent.")
    topk_chunk: int = Field(
        4096, ge=16, le=65536, description="topk: values per chunk (a power of two; indices take log2 bits)."
    )
    topk_bits: int = Field(2, ge=2, le=8, description="topk: bits per value (one of them the sign).")
    powersgd_rank: int = Field(16, ge=1, description="powersgd: rank of each matrix's factorisation.")
    exact_below: int = Field(
        16384, ge=0, description="Tensors with fewer elements travel exactly (fp32) under any compressor."
    )
    error_feedback: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Decay of the residual a compressor leaves, added to the next round's pseudo-gradient "
        "(0: no error feedback).",
    )
    outer_lr: float = Field(1.0, gt=0, description="Outer step size on the mean pseudo-gradient.")
    outer_lr_scale: Literal["auto", "none", "sqrt_replicas"] = Field(
        "auto",
        description="sqrt_replicas: the outer step is outer_lr x sqrt(shares in the round). A replica whose "
        "Adam steps on 1/R of a batch (sync, where the replicas split each step's micro-batches) takes up to "
        "sqrt(R) shorter steps than one Adam on the whole batch, and the mean keeps that shrinkage "
        "(docs/benchmarks/scale). auto: sqrt_replicas under sync, none under async (each replica steps on "
        "whole batches there).",
    )
    outer_momentum: float = Field(
        0.0, ge=0, lt=1, description="Nesterov momentum of the outer step (DiLoCo: 0.9 with outer_lr 0.7)."
    )
    round_timeout: float = Field(
        30.0,
        gt=0,
        description="swarm: seconds the round's leader waits, after the first replica's vote, for the others "
        "before it decides the round with the replicas it has (a late or dead one is left out).",
    )
    overlap: bool = Field(
        True,
        description="Rounds overlap with compute: the next inner steps run while a round is in flight and "
        "its result is applied as a delta when it lands (at the latest one round later). false (every round "
        "lands before the next inner step) only in `pmnode bench convergence --replicas`: swarms refuse it.",
    )

    @model_validator(mode="after")
    def _chunk(self) -> ReplicaSyncConfig:
        if self.topk_chunk & (self.topk_chunk - 1):
            raise ValueError(f"topk_chunk={self.topk_chunk} is not a power of two")
        return self


def check_for_swarm(rs: ReplicaSyncConfig, schedule: str) -> None:
    """What a swarm cannot honour. Its outer rounds always overlap with compute (a replica that stopped
    taking micro-batches for a round would stall every head routed through it); `overlap: false` is
    the in-process convergence bench's reference (pmnode bench convergence --replicas). Method grads
    rides on the sync commit; async replicas do not commit together."""
    if rs.method == "grads" and schedule != "sync":
        raise ConfigError(
            "replica_sync.method: grads needs swarm.schedule: sync (the replicas' compressed sums meet in "
            "each step's commit); under async use method outer or step"
        )
    if rs.method == "outer" and not rs.overlap:
        raise ConfigError(
            "replica_sync.overlap: false is for `pmnode bench convergence --replicas` only: a swarm's outer "
            "rounds always overlap with compute; remove it from the swarm's config"
        )
