"""Swarm policy as pure functions over announced records: DHT keys, stage choice, peer choice.

Every peer computes the same answer from the same records (sorted, deterministic
tie-breaks), as Petals does for block selection; the loops that act on these
stay thin.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pmnode.errors import ConfigError
from pmnode.net.outer_report import OuterReport

HEARTBEAT_PERIOD = 2.0  # seconds between a node's announcements
RECORD_TTL = 3 * HEARTBEAT_PERIOD  # a node missing three beats is gone


def stage_key(run: str, stage: int) -> str:
    return f"{run}.stage.{stage}"


def config_key(run: str) -> str:
    return f"{run}.config"


class StageRecord(BaseModel):
    """What a node announces about itself under its stage key (subkey: its peer id)."""

    model_config = ConfigDict(extra="forbid")

    peer_id: str
    stage: int = Field(ge=0)
    slot: int = Field(0, ge=0, description="A head's slot (its part of the data order); 0 elsewhere.")
    driving_since: int | None = Field(
        None, ge=0, description="A head: the step it began driving at (the earliest leads a sync commit)."
    )
    state: Literal["joining", "online", "offline"] = "online"
    throughput: float = Field(0.0, ge=0, description="Samples/s this node measured on its own stage.")
    queue: int = Field(0, ge=0, description="Micro-batches in flight through this node.")
    step: int = Field(0, ge=0)
    samples: int = Field(0, ge=0, description="Samples this node has applied in optimizer steps.")
    loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float = 0.0
    wire_bytes_per_s: float = 0.0
    device: str = "cpu"
    refused: dict[str, int] = Field(
        default_factory=dict,
        description="Calls this node's guard refused: 'data' (every data and control RPC) and "
        "'averaging.<door>' (join, part, state; leader, group: outsiders it would not average with).",
    )
    time: float = 0.0
    reach: Literal["direct", "relayed", "outbound"] = Field(
        "direct", description="How others reach it: directly, through a relay, or not at all (the head)."
    )
    addrs: list[str] = Field([], max_length=8, description="Where to dial it (relayed: circuit addresses).")
    relay: bool = Field(False, description="It relays for others (`pmnode join --relay`).")
    outer: OuterReport | None = Field(None, description="Its outer replica rounds (replica_sync outer).")
    problem: str | None = Field(
        None, max_length=300, description="What its operator must fix, e.g. checkpoints failing: a full disk."
    )


def live(records: Iterable[StageRecord]) -> list[StageRecord]:
    return sorted((r for r in records if r.state != "offline"), key=lambda r: r.peer_id)


def capacity(records: Iterable[StageRecord]) -> float:
    """A stage's capacity: summed throughput; a node that has not measured yet counts as 1."""
    return sum(r.throughput or 1.0 for r in live(records))


def head_slot(heads_now: Iterable[StageRecord], slots: int, caller: str | None = None) -> int | None:
    """The head slot a node joining stage 0 gets, or None when every slot has a live head.

    A caller that already holds a slot (renewing its certificate) keeps it. Otherwise the lowest slot
    that no online head holds and no node was just assigned to (`joining`, which the coordinator keeps
    for a short while only): two heads of one slot would read the same part of the data order, so a
    second joiner waits until the first comes up or its assignment lapses.
    """
    recs = live(heads_now)
    for r in recs:
        if r.peer_id == caller:
            return r.slot
    taken = {r.slot for r in recs if r.state in ("online", "joining")}
    free = [s for s in range(slots) if s not in taken]
    return free[0] if free else None


def choose_stage(
    by_stage: Mapping[int, Iterable[StageRecord]],
    n_stages: int,
    requested: int | None = None,
    caller: str | None = None,
    slots: int = 1,
) -> int:
    """The stage a joining node serves: the requested one if valid, else the weakest.

    Empty stages come first (the swarm cannot train without them), then the least
    capacity; ties go to the lowest index so every caller agrees. Stage 0 has `slots` head
    slots (swarm.heads): a node joins it only while one of them has no live head.
    """
    heads = list(by_stage.get(0, ()))
    full = head_slot(heads, slots, caller) is None
    if requested is not None:
        if not 0 <= requested < n_stages:
            raise ConfigError(f"stage {requested} is out of range: this run has stages 0..{n_stages - 1}")
        if requested == 0 and full:
            held = [r.peer_id[-8:] for r in live(heads) if r.state in ("online", "joining")]
            raise ConfigError(
                f"stage 0 already has its {slots} head(s) ({', '.join(held)}); swarm.heads sets how many "
                "a run has: join another stage, or leave --stage out (a node just assigned holds its slot "
                "for a few seconds until it comes up)"
            )
        return requested
    open_ = [s for s in range(n_stages) if s or not full]
    return min(open_, key=lambda s: (capacity(by_stage.get(s, ())), s))


def score(
    r: StageRecord, unmeasured: float = 1.0, link: float | None = None, queue: int | None = None
) -> float:
    """Expected service rate for one more micro-batch: the slower of its compute throughput and the
    rate measured on our link to it (net.links; None: not measured yet), shared with its queue: the
    sender's own count of what it has in flight there when it keeps one, else the announced queue."""
    rate = r.throughput or unmeasured
    return (min(rate, link) if link else rate) / (1 + (r.queue if queue is None else queue))


def choose_peer(
    records: Iterable[StageRecord],
    exclude: Iterable[str] = (),
    rng: random.Random | None = None,
    links: Mapping[str, float] | None = None,
    inflight: Mapping[str, int] | None = None,
) -> StageRecord | None:
    """Pick a downstream replica by score; random among near-equals to spread load.

    Candidates within 10% of the best score are equally good; without an rng the
    choice is the first of them by peer id (deterministic, for tests). A replica that
    has not measured itself yet (it just joined) is taken to be as fast as the fastest,
    so it gets micro-batches to measure itself on instead of starving. `links`: samples/s measured
    on our calls to each replica; a relayed or far replica measures slower and gets less work.

    `inflight`: the micro-batches this sender has in flight at each replica, counted as it sends and
    gets answers. The announced queue is a heartbeat old: a step's micro-batches go out within
    milliseconds, so by it they all see the same scores and pile onto one replica (seen in real
    swarms: one of two tail replicas served 217 of 240). A sender's own count moves with every send.
    """
    banned = set(exclude)
    cands = [r for r in live(records) if r.peer_id not in banned and r.state == "online"]
    if not cands:
        return None
    fresh = max((r.throughput for r in cands), default=0.0) or 1.0
    link = links or {}
    mine = None if inflight is None else {r.peer_id: inflight.get(r.peer_id, 0) for r in cands}
    scores = {
        r.peer_id: score(r, fresh, link.get(r.peer_id), None if mine is None else mine[r.peer_id])
        for r in cands
    }
    best = max(scores.values())
    near = [r for r in cands if scores[r.peer_id] >= 0.9 * best]
    return rng.choice(near) if rng else near[0]


class Backoff:
    """Replicas that failed us, skipped for a while that doubles with each failure in a row.

    A first failure skips a peer for `base` seconds, the next for twice that, up to `cap`; a success
    forgets its failures. So a peer that died is tried rarely, and one that hiccuped soon again.
    """

    def __init__(self, base: float = 1.0, cap: float = 60.0):
        self.base, self.cap = base, cap
        self.failures: dict[str, tuple[int, float]] = {}  # peer -> (failures in a row, skipped until)

    def fail(self, peer: str, now: float) -> float:
        n = self.failures.get(peer, (0, 0.0))[0] + 1
        wait = min(self.base * 2.0 ** (n - 1), self.cap)
        self.failures[peer] = (n, now + wait)
        return wait

    def ok(self, peer: str) -> None:
        self.failures.pop(peer, None)

    def skipped(self, now: float) -> list[str]:
        return [p for p, (_, until) in self.failures.items() if until > now]
