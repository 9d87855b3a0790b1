"""Stage assignment and replica choice: pure functions over announced records."""

from __future__ import annotations

import random

import pytest

from pmnode.errors import ConfigError
from pmnode.net.routing import StageRecord, capacity, choose_peer, choose_stage, head_slot


def rec(peer: str, stage: int = 0, **kw) -> StageRecord:
    return StageRecord(peer_id=peer, stage=stage, **kw)


def test_empty_stages_first_then_least_capacity() -> None:
    assert choose_stage({}, 3) == 0
    assert choose_stage({0: [rec("a")]}, 3) == 1
    full = {0: [rec("a", throughput=5)], 1: [rec("b", 1, throughput=2)], 2: [rec("c", 2, throughput=9)]}
    assert choose_stage(full, 3) == 1
    full[1].append(rec("d", 1, throughput=4))
    assert choose_stage(full, 3) == 1  # stage 0 is weaker, but its one head slot is taken
    assert choose_stage(full, 3, slots=2) == 0  # a second head slot is open: the weakest stage
    full[0] = [rec("a", state="offline")]
    assert choose_stage(full, 3) == 0  # the head is gone: its stage is empty, so it comes first


def test_offline_records_do_not_count() -> None:
    assert capacity([rec("a", throughput=3, state="offline"), rec("b", throughput=2)]) == 2
    assert choose_stage({0: [rec("a", state="offline")], 1: [rec("b", 1)]}, 2) == 0


def test_requested_stage_is_checked() -> None:
    assert choose_stage({}, 4, requested=3) == 3
    with pytest.raises(ConfigError, match=r"stage 4 is out of range: this run has stages 0\.\.3"):
        choose_stage({}, 4, requested=4)
    with pytest.raises(ConfigError, match=r"already has its 1 head\(s\) \(a\); swarm.heads sets how many"):
        choose_stage({0: [rec("a")]}, 4, requested=0)
    assert choose_stage({0: [rec("a")]}, 4, requested=0, caller="a") == 0  # the head renewing its certificate


def test_head_slots() -> None:
    """Several heads: each gets the lowest free slot; a renewing head keeps its own; a full stage 0
    refuses `--stage 0` in one line."""
    assert head_slot([], 2) == 0
    assert head_slot([rec("a")], 2) == 1
    assert head_slot([rec("a"), rec("b", slot=1)], 2) is None
    assert head_slot([rec("a"), rec("b", slot=1)], 2, caller="b") == 1  # renewing
    assert head_slot([rec("a", state="offline"), rec("b", slot=1)], 2) == 0  # a dead head frees its slot
    assert head_slot([rec("a", state="joining")], 2) == 1  # just assigned: another slot first
    # ...and none to a second joiner while it is pending: two heads of a slot would read the same data
    assert head_slot([rec("a", state="joining"), rec("b", slot=1)], 2) is None
    assert head_slot([rec("a", state="joining"), rec("b", slot=1)], 2, caller="a") == 0
    assert choose_stage({0: [rec("a")]}, 4, requested=0, slots=2) == 0
    with pytest.raises(ConfigError, match=r"already has its 2 head\(s\) \(a, b\)"):
        choose_stage({0: [rec("a"), rec("b", slot=1)]}, 4, requested=0, slots=2)


def test_peer_choice_by_throughput_and_queue() -> None:
    recs = [rec("a", throughput=10, queue=4), rec("b", throughput=6, queue=0), rec("c", throughput=1)]
    assert choose_peer(recs).peer_id == "b"  # 6/1 beats 10/5
    assert choose_peer(recs, exclude=["b"]).peer_id == "a"
    assert choose_peer([rec("a", state="joining")]) is None
    assert choose_peer([]) is None


def test_the_senders_own_in_flight_count_spreads_a_burst() -> None:
    # Records a heartbeat old say both replicas are idle; a step's micro-batches go out at once. By
    # the records alone (no rng) all four would go to "a"; by the sender's own count they alternate.
    recs = [rec("a", throughput=10), rec("b", throughput=10)]
    assert [choose_peer(recs).peer_id for _ in range(4)] == ["a"] * 4
    inflight: dict[str, int] = {}
    for _ in range(4):
        p = choose_peer(recs, inflight=inflight).peer_id
        inflight[p] = inflight.get(p, 0) + 1
    assert inflight == {"a": 2, "b": 2}
    # The count replaces the announced queue (it already holds what we sent): a stale queue of 5
    # does not keep "a" out once our own calls there have come back.
    stale = [rec("a", throughput=10, queue=5), rec("b", throughput=10)]
    assert choose_peer(stale, inflight={"b": 1}).peer_id == "a"
    # A twice-as-fast replica takes two for the slower one's one.
    fast = [rec("a", throughput=20), rec("b", throughput=10)]
    inflight = {}
    for _ in range(6):
        p = choose_peer(fast, inflight=inflight).peer_id
        inflight[p] = inflight.get(p, 0) + 1
    assert inflight == {"a": 4, "b": 2}


def test_near_equal_peers_share_load() -> None:
    recs = [rec("a", throughput=10), rec("b", throughput=9.5), rec("c", throughput=1)]
    picks = {choose_peer(recs, rng=random.Random(i)).peer_id for i in range(50)}
    assert picks == {"a", "b"}


def test_backoff_doubles_and_a_success_forgets() -> None:
    from pmnode.net.routing import Backoff

    b = Backoff(base=1.0, cap=4.0)
    assert [b.fail("p", 0.0) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert b.skipped(3.9) == ["p"] and b.skipped(4.1) == []
    b.ok("p")
    assert b.fail("p", 10.0) == 1.0


def test_measured_links_steer_the_choice() -> None:
    from pmnode.net.links import LinkStats

    recs = [rec("direct", 1, throughput=10), rec("relayed", 1, throughput=10, reach="relayed")]
    links = LinkStats(alpha=0.5)
    links.observe("direct", 0.1, 4)  # 40 samples/s of call time: compute-bound (10)
    links.observe("relayed", 1.0, 4)  # 4 samples/s: the link is the bottleneck
    assert links.rates() == {"direct": 40.0, "relayed": 4.0}
    assert choose_peer(recs, links=links.rates()).peer_id == "direct"
    picks = [choose_peer(recs, rng=random.Random(i), links=links.rates()).peer_id for i in range(50)]
    assert set(picks) == {"direct"}  # 10 vs 4: not near-equal, the slow link gets nothing new
    links.observe("relayed", 0.2, 4)  # the circuit got faster: (4 + 20) / 2 = 12 samples/s
    assert links.links["relayed"].samples_per_s == pytest.approx(12.0)
    picks = [choose_peer(recs, rng=random.Random(i), links=links.rates()).peer_id for i in range(50)]
    assert set(picks) == {"direct", "relayed"}  # both compute-bound again: they share the load
    links.forget("relayed")  # a failed route is measured afresh
    assert "relayed" not in links.rates()


def test_a_link_measured_slow_once_is_measured_again_after_its_ttl() -> None:
    from pmnode.net.links import LinkStats

    now = [0.0]
    links = LinkStats(alpha=0.5, ttl=5.0, clock=lambda: now[0])
    recs = [rec("a", 1, throughput=10), rec("b", 1, throughput=10)]
    links.observe("a", 0.1, 4)  # 40 samples/s
    links.observe("b", 1.0, 4)  # 4 samples/s: a busy moment
    assert choose_peer(recs, links=links.rates()).peer_id == "a"  # "b" gets no calls to re-measure it
    now[0] = 4.0
    links.observe("a", 0.1, 4)
    now[0] = 6.0  # "b" not called for 6 s: its rate is no longer trusted, its compute rate counts
    assert links.rates() == {"a": 40.0}
    picks = {choose_peer(recs, rng=random.Random(i), links=links.rates()).peer_id for i in range(50)}
    assert picks == {"a", "b"}  # min(10, 40) vs 10: equals again
    links.observe("b", 0.1, 4)  # measured afresh, not smoothed with the stale 4 samples/s
    assert links.links["b"].samples_per_s == pytest.approx(40.0)
