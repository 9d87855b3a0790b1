"""The swarm as the coordinator shows it (status RPC, `/status`, `pmnode status`): a pure function of
the run config, the announced members, the pending assignments and the loss history."""

from __future__ import annotations

import time

from coordinator.state import head_of
from pmnode.config import RunConfig
from pmnode.core.stages import split_layers
from pmnode.net.routing import StageRecord
from pmnode.net.status import HistoryPoint, Replica, StageStatus, SwarmStatus


def _stage_status(i: int, n_stages: int, layers: range, recs: list[StageRecord], now: float) -> StageStatus:
    role = "head" if i == 0 else "tail" if i == n_stages - 1 else "body"
    replicas = [
        Replica(**r.model_dump(), last_seen_s=round(max(now - r.time, 0.0), 1) if r.time else 0.0)
        for r in recs
    ]
    return StageStatus(
        stage=i,
        role=role,
        layers=(layers.start, layers.stop),
        replicas=replicas,
        throughput=sum(r.throughput for r in recs if r.state == "online"),
    )


def swarm_status(
    cfg: RunConfig,
    fingerprint: str | None,
    *,
    members: dict[int, list[StageRecord]],
    shown: dict[int, list[StageRecord]],
    history: list[HistoryPoint],
    global_step: int,
    coordinator: list[str],
) -> SwarmStatus:
    """`members`: the announced records; `shown`: the same with the assigned nodes not yet announced."""
    now = time.time()
    ranges = split_layers(cfg.model.n_layers, cfg.n_stages, cfg.stage_layers)
    stages = [_stage_status(i, cfg.n_stages, rng, shown.get(i, []), now) for i, rng in enumerate(ranges)]
    head = head_of(members)
    return SwarmStatus(
        run=cfg.name,
        fingerprint=fingerprint,
        d_model=cfg.model.d_model,
        compression_rank=cfg.rank if fingerprint else None,
        codec=cfg.codec_spec,
        schedule=cfg.swarm.schedule,
        n_stages=cfg.n_stages,
        target_steps=cfg.train.steps,
        global_step=global_step,
        loss=head.loss if head else (history[-1].loss if history else None),
        heldout_loss=next((h.heldout_loss for h in reversed(history) if h.heldout_loss), None),
        # Several heads: each reports its own tokens; the swarm trains all of them.
        tokens_per_s=sum(r.tokens_per_s for r in members.get(0, []) if r.state == "online"),
        heads=cfg.swarm.heads,
        wire_bytes_per_s=sum(r.wire_bytes_per_s for recs in members.values() for r in recs),
        stages=stages,
        history=history,
        coordinator=coordinator,
        time=now,
    )
