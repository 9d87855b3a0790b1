"""Spot checks of compute, the pure policy: which micro-batches to check, when two outputs agree, who
lied, and what the checker remembers. pmnode.swarm.spot_checks acts on it; the tests drive it with fakes.

    sample   each micro-batch is checked with probability `rate` (a seeded rng in tests; unseeded in a
             node, so no replica can tell which of its micro-batches will be asked about)
    agree    two activation packets agree when their token ids are equal and their decoded values are
             within `tolerance` in relative L2 (bf16 autocast and int8 rounding: about 1e-2)
    verdict  A (served the micro-batch) and B (computed it again) disagree: a third opinion C decides;
             the one C disagrees with, while agreeing with the other, is the liar; anything else
             (no third replica, C agrees with both or neither) names both and bans nobody, but its step
             is computed again (new checks, and by then perhaps a third replica to decide)
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pmnode.core.codecs import Packet

MAX_BANNED = 4096  # peers remembered as liars (any token holder can make more ids): the oldest goes


def decoded(p: Packet) -> Tensor:
    """An activation packet's values, decoded without the codec: int8 codes times their scale, a float
    tensor as is, anything else every non-token tensor flattened."""
    t = p.tensors
    if "q" in t and "scale" in t:
        return t["q"].float() * t["scale"].float()
    if "v" in t:
        return t["v"].float()
    parts = [v.float().reshape(v.shape[0], -1) for k, v in sorted(t.items()) if k != "tokens"]
    return torch.cat(parts, dim=1) if parts else torch.zeros(0)


def distance(a: Packet, b: Packet) -> float:
    """Relative L2 distance between two activation packets; inf when their layout or token ids differ."""
    if sorted(a.tensors) != sorted(b.tensors):
        return float("inf")
    for k in a.tensors:
        if a.tensors[k].shape != b.tensors[k].shape or a.tensors[k].dtype != b.tensors[k].dtype:
            return float("inf")
    if "tokens" in a.tensors and not torch.equal(a.tensors["tokens"], b.tensors["tokens"]):
        return float("inf")
    x, y = decoded(a), decoded(b)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("inf")
    scale = max(float(y.norm()), float(x.norm()), 1e-12)
    return float((x - y).norm()) / scale


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: `liar` is banned; `named` are the replicas whose outputs differed."""

    outcome: str  # "agree", "liar", "undecided", "skipped"
    liar: str | None = None
    named: tuple[str, ...] = ()


def decide(
    a: str, b: str, ab: bool, c: str | None = None, ac: bool | None = None, bc: bool | None = None
) -> Verdict:
    """A served, B recomputed; `ab` whether they agree. C (if any) recomputed too; `ac`/`bc` whether it
    agrees with A / B. The liar is the one the third opinion sides against."""
    if ab:
        return Verdict("agree")
    if c is None or ac is None or bc is None:
        return Verdict("undecided", named=(a, b))
    if bc and not ac:
        return Verdict("liar", liar=a, named=(a, b))
    if ac and not bc:
        return Verdict("liar", liar=b, named=(a, b))
    return Verdict("undecided", named=(a, b, c))


class Sampler:
    """Which micro-batches are checked: each with probability `rate`, independently."""

    def __init__(self, rate: float, rng: random.Random | None = None):
        self.rate, self.rng = rate, rng or random.Random()

    def pick(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate


@dataclass
class Ledger:
    """What the checker knows: counts by outcome, the liars banned (bounded), and the steps whose
    gradients a liar may have touched (they are computed again before they are applied): the step a liar
    was caught in, and a step with a disagreement no third opinion could decide."""

    counts: Counter[str] = field(default_factory=Counter)
    banned: OrderedDict[str, int] = field(default_factory=OrderedDict)  # liar -> step it was caught at
    tainted: set[int] = field(default_factory=set)
    # the last few verdicts, for the node's summary
    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: int, v: Verdict) -> bool:
        """Count a verdict; True when it bans a replica not banned before."""
        self.counts[v.outcome] += 1
        if v.outcome in ("liar", "undecided"):
            self.events = [
                *self.events[-19:],
                {"step": step, "outcome": v.outcome, "named": list(v.named), "liar": v.liar},
            ]
        if v.outcome == "undecided":  # one of them lied, or both: the step must not apply as it is
            self.tainted.add(step)
        if v.liar is None or v.liar in self.banned:
            return False
        while len(self.banned) >= MAX_BANNED:
            self.banned.popitem(last=False)
        self.banned[v.liar] = step
        self.tainted.add(step)
        self.counts["banned"] += 1
        return True

    def is_banned(self, peer: str) -> bool:
        return peer in self.banned

    def take_tainted(self, step: int) -> bool:
        """Whether `step`'s gradients must be computed again (once: the mark is consumed)."""
        if step in self.tainted:
            self.tainted.discard(step)
            return True
        return False
