"""Replica-sync traffic of a stage, as the plan prices it: what one replica sends and receives per
round, how often, and whether the round hides behind compute.

The replicas of a stage (the heads, for stage 0) keep one model by one of three exchanges
(`replica_sync.method`, and `swarm.schedule` for step):

- **outer** (DiLoCo-like): every H = inner_steps steps, each replica's compressed pseudo-gradient,
  `round_bytes` over the stage's parameter shapes (pmnode.core.compress), exactly what it sends. The
  round is an all-gather over hivemind-style direct streams: each replica sends its share to each of
  the R - 1 others and receives theirs (`topology` "all-gather"; "relay": one upload to a relay that
  fans it out, the downloads unchanged). With `overlap` the round runs during the next H steps and
  only costs time when it takes longer; without, the stage waits for it.
- **step, sync**: at every step's commit each replica fetches every other replica's fp32 gradient
  sums (pmnode.swarm.participant), an all-gather the commit waits for.
- **grads** (sync only): the same all-gather in every commit, of each replica's compressed share of
  its sums (`round_bytes`, as outer's shares; pmnode.core.grad_sync).
- **step, async**: every `swarm.average_period` seconds a hivemind all-reduce of every parameter
  (fp16 from 16 Ki elements, `swarm.average_compression`): each replica sends and receives
  2 (R - 1) / R of the stage's bytes (a part to each peer, the averaged part back). Rounds start on
  the period's grid after the last one ended, so a round longer than the period only makes the
  replicas average less often: it costs learning, not throughput.

A round beside compute takes the link the activations leave (paced behind them, a background
transfer): it costs throughput only when it cannot land within its H steps. Links are symmetric: a
node's downlink is taken as fast as its uplink (the plan's one bandwidth).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel

from pmnode.config.replica_sync import ReplicaSyncConfig
from pmnode.core.compress import round_bytes
from pmnode.plan.shapes import Shape

Topology = Literal["all-gather", "relay"]
FP16_FROM = 2**14  # pmnode.swarm.averaging: smaller tensors are averaged exactly (fp32)


class SyncSettings(BaseModel):
    """What the plan prices: the run's replica_sync section and how its rounds travel."""

    replica_sync: ReplicaSyncConfig
    schedule: Literal["sync", "async"]
    average_period: float  # async step: seconds between rounds
    average_compression: Literal["none", "float16"] = "float16"
    topology: Topology = "all-gather"

    def describe(self) -> str:
        rs = self.replica_sync
        if rs.method == "step":
            return (
                "step: fp32 gradient sums every step"
                if self.schedule == "sync"
                else (f"step: parameters averaged every {self.average_period:g} s")
            )
        how = {
            "none": "exact fp32",
            "topk": f"top-k {rs.topk_fraction:.3g} at {rs.topk_bits} bits",
            "powersgd": f"powersgd rank {rs.powersgd_rank}",
        }[rs.compressor]
        if rs.method == "grads":
            return f"grads: {how} every step, in the commit, {self.topology}"
        return f"outer: {how} every {rs.inner_steps} steps, {self.topology}" + (
            "" if rs.overlap else ", not overlapped"
        )


class SyncLoad(BaseModel):
    """One stage's replica-sync traffic, per replica and round."""

    share_bytes: int  # one replica's share of a round (what it contributes once)
    up_bytes: int  # what it uploads per round
    down_bytes: int  # what it downloads per round
    every_steps: int | None  # a round every this many steps (outer: H; sync step: 1)
    every_s: float | None  # or every this many seconds (async step)
    blocking: bool  # the stage waits for the round (sync step: in the commit; outer without overlap)
    in_commit: bool = False  # sync step: the exchange is part of every step's commit


def sync_load(shapes: list[Shape], nodes: int, s: SyncSettings) -> SyncLoad | None:
    """The stage's traffic with `nodes` replicas; None for a stage alone (it never syncs)."""
    if nodes < 2:
        return None
    rs, peers = s.replica_sync, nodes - 1
    if rs.method == "step" and s.schedule == "async":
        fp16 = s.average_compression == "float16"
        size = sum((2 if fp16 and math.prod(x) >= FP16_FROM else 4) * math.prod(x) for x in shapes)
        part = math.ceil(2 * peers / nodes * size)
        return SyncLoad(
            share_bytes=size, up_bytes=part, down_bytes=part, every_steps=None, every_s=s.average_period,
            blocking=False,
        )  # fmt: skip
    exact = rs.method == "step"  # sync step: the full fp32 gradient, every step, in the commit
    commit = rs.method in ("step", "grads")  # grads: a compressed share, every step, in the commit
    share = 4 * sum(math.prod(x) for x in shapes) if exact else round_bytes(shapes, rs)
    up = share if s.topology == "relay" else share * peers
    return SyncLoad(
        share_bytes=share, up_bytes=up, down_bytes=share * peers, every_steps=1 if commit else rs.inner_steps,
        every_s=None, blocking=commit or not rs.overlap, in_commit=commit,
    )  # fmt: skip


def overlapped_per_token(load: SyncLoad, tokens_per_step: int) -> tuple[float, float]:
    """(up, down) bytes per swarm token of a round that runs beside compute every H steps."""
    if load.blocking or load.every_steps is None:
        return 0.0, 0.0
    span = load.every_steps * tokens_per_step
    return load.up_bytes / span, load.down_bytes / span


def blocking_s_per_step(load: SyncLoad, bandwidth: float | None) -> float:
    """Seconds per step a stage waits for its rounds (the pipeline is drained: the link is free)."""
    if not load.blocking or load.every_steps is None or not bandwidth:
        return 0.0
    return max(load.up_bytes, load.down_bytes) / bandwidth / load.every_steps


def stage_loads(
    shapes: list[list[Shape]], heads: int, replicas: int, s: SyncSettings
) -> list[SyncLoad | None]:
    """Every stage's load: stage 0's replicas are the heads."""
    return [sync_load(x, heads if i == 0 else replicas, s) for i, x in enumerate(shapes)]
