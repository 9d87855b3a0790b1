"""Outer rounds between a stage's replicas, without a network: the leader's policy (who leads, which
members, a late or missing replica), shares as bytes, and a malformed share refused and counted."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from pmnode.config import ReplicaSyncConfig, RunConfig
from pmnode.core.codecs import Packet
from pmnode.core.compress import Malformed, decompress, round_bytes
from pmnode.core.outer import OuterSync
from pmnode.core.share_bytes import pack_share, unpack_share
from pmnode.core.snapshot_meta import StateMeta
from pmnode.errors import PmnodeError
from pmnode.net.meta import AckMeta, Meta
from pmnode.net.outer_rpcs import Vote
from pmnode.net.wire import MessageHeader, WireError
from pmnode.swarm.outer_peer import OuterPeer
from pmnode.swarm.outer_round import Ledger, leader_of, members, sample_cap

TOPK = ReplicaSyncConfig(method="outer", compressor="topk", exact_below=0, topk_chunk=64, topk_fraction=0.125)
LOWRANK = ReplicaSyncConfig(method="outer", compressor="powersgd", powersgd_rank=2, exact_below=0)


def _vote(r: int, *have: str, final: bool = False) -> Vote:
    return Vote(round=r, have=list(have), final=final)


def test_the_lowest_peer_id_leads() -> None:
    assert leader_of("b", ["c", "a"]) == "a" and leader_of("a", []) == "a"


def test_everyone_in_with_every_share_decides_at_once_in_sorted_order() -> None:
    led = Ledger("a", timeout=30.0)
    assert led.vote("a", _vote(0, "a", "b"), ["b"], now=0.0).status == "pending"  # b has not voted
    d = led.vote("b", _vote(0, "b", "a"), ["b"], now=0.1)
    assert d.status == "decided" and d.members == ["a", "b"] and d.next_round == 1
    # a decision never changes, whoever asks again
    assert led.vote("a", _vote(0, "a"), ["b"], now=99.0).members == ["a", "b"]


def test_a_late_replica_is_left_out_at_the_deadline_and_told_where_to_go_on() -> None:
    led = Ledger("a", timeout=10.0)
    for t, voter in ((0.0, "a"), (1.0, "b")):
        d = led.vote(voter, _vote(3, "a", "b"), ["b", "c"], now=t)
        assert d.status == "pending"  # c is live and may still come
    led.tick(["b", "c"], now=10.5)  # the deadline passes with nobody voting again
    d = led.vote("c", _vote(3, "a", "b", "c"), ["b", "c"], now=11.0)
    assert d.status == "decided" and d.members == ["a", "b"] and d.next_round == 4
    # a replica asking about a round long forgotten moves on at once
    for r in range(4, 40):
        led.vote("a", _vote(r, "a"), [], now=100.0 + r)
    old = led.vote("c", _vote(3, "c"), ["a"], now=200.0)
    assert old.status == "gone" and old.next_round == 40  # it copies a member's state


def test_a_share_that_did_not_arrive_leaves_a_member_out_and_the_rest_agree() -> None:
    votes = {"a": _vote(0, "a", "b"), "b": _vote(0, "a", "b", "c"), "c": _vote(0, "b", "c")}
    # c's share never reached a, and a's never reached c: one of them goes (the higher id on a tie)
    assert members(votes) == ["a", "b"]
    assert members({"a": _vote(0, "a")}) == ["a"]
    assert members({"a": _vote(0, "b"), "b": _vote(0, "a")}) == []  # nobody holds its own share


def test_final_only_when_every_member_is_final() -> None:
    led = Ledger("a", timeout=1.0)
    led.vote("a", _vote(0, "a", "b", final=True), ["b"], now=0.0)
    assert led.vote("b", _vote(0, "a", "b", final=False), ["b"], now=0.1).final is False


@pytest.mark.parametrize("cfg", [TOPK, LOWRANK, TOPK.model_copy(update={"compressor": "none"})])
def test_a_share_travels_as_exactly_round_bytes(cfg: ReplicaSyncConfig) -> None:
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Linear(40, 24), nn.LayerNorm(24))
    sync = OuterSync(list(mod.parameters()), cfg)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p))
    share = sync.start()
    buf = pack_share(share.tensors)
    shapes = sync.shapes
    assert buf.dtype == torch.uint8 and buf.numel() == round_bytes(shapes, cfg) == share.nbytes()
    back = unpack_share(buf, shapes, cfg)
    for a, b, s in zip(share.tensors, back, shapes, strict=True):
        assert torch.equal(decompress(a, s, cfg), decompress(b, s, cfg))
    with pytest.raises(Malformed):
        unpack_share(buf[:-1], shapes, cfg)


class _Runner:
    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def _peer(cfg: ReplicaSyncConfig, shapes: list[tuple[int, ...]], live: list[str]) -> OuterPeer:
    run = RunConfig.model_validate({"name": "t", "replica_sync": cfg.model_dump()})
    said: list[str] = []

    def header(micro_batch: str, meta: Meta | None = None) -> MessageHeader:
        return MessageHeader.of(meta or AckMeta(), run="t", micro_batch=micro_batch, stage=1, step=0)

    ctx = SimpleNamespace(cfg=run, peer_id="b", runner=_Runner(), header=header, say=said.append)

    class View:
        async def my_replicas(self) -> list[str]:
            return live

    return OuterPeer(ctx, View(), shapes, sample_cap(run), lambda: 2)  # type: ignore[arg-type]


def _send(
    peer: OuterPeer, buf: torch.Tensor | None, kind: str = "share", **meta: Any
) -> tuple[MessageHeader, Packet]:
    header = MessageHeader(kind=kind, run="t", micro_batch="outer", stage=1, step=0, meta=meta)  # type: ignore[arg-type]
    packet = Packet({} if buf is None else {"share": buf})
    return asyncio.run(peer.rpc_outer_share(header, packet, "c"))


def test_malformed_shares_are_refused_counted_and_never_stored() -> None:
    mod = nn.Linear(100, 1, bias=False)  # one (1, 100) tensor: 2 chunks of 64
    sync = OuterSync(list(mod.parameters()), TOPK)
    good = pack_share(sync.start().tensors)
    peer = _peer(TOPK, sync.shapes, live=["c"])
    cap = peer.cap
    nan = good.clone()
    nan[-4:] = torch.tensor([0, 0x7E, 0, 0x7E], dtype=torch.uint8)  # the last chunk's scales: fp16 NaN
    cases = {
        "size": (good[:-3], {"round": 2, "samples": 8}),
        "non-finite": (nan, {"round": 2, "samples": 8}),
        "samples": (good, {"round": 2, "samples": cap + 1}),
        "round": (good, {"round": 9, "samples": 8}),
        "meta": (good, {"kind": "activation", "samples": 8}),  # another kind's header
    }
    cases["negative"] = (good, {"round": 2, "samples": -1})
    for reason, (buf, meta) in cases.items():
        # a WireError is a strike against the sender (the serving layer's); a round too far ahead is not
        with pytest.raises(PmnodeError) as e:
            _send(peer, buf, **meta)
        assert isinstance(e.value, WireError) == (reason != "round"), reason
        assert peer.shares.holders(2) == [], reason
    with pytest.raises(WireError):
        _send(peer, None, round=2, samples=8)
    with pytest.raises(ValueError):  # an ill-typed share meta never gets past the header's decode
        _send(peer, good, round=2, samples="8")
    counted = dict(peer.counts.refused)
    assert counted["size"] == 1 and counted["non-finite"] == 1 and counted["samples"] == 2
    assert counted["round"] == 1 and counted["meta"] == 1 and sum(counted.values()) == 7
    # a late share is no offence; a good one is kept as the caller's, whatever it claims
    _, _ = _send(peer, good, round=1, samples=8)
    _send(peer, good, round=2, samples=cap)
    assert peer.shares.holders(2) == ["c"] and sum(peer.counts.refused.values()) == 7
    assert dataclasses.asdict(peer.shares.take(2, ["c"])[0])["samples"] == cap


def test_a_vote_to_a_replica_that_is_not_the_lowest_is_turned_away() -> None:
    peer = _peer(TOPK, [(4, 4)], live=["a", "c"])  # "a" is lower than this replica ("b")
    d = asyncio.run(peer.rpc_outer_vote(_vote(2, "c"), "c"))
    assert d.status == "not_leader"
    peer2 = _peer(TOPK, [(4, 4)], live=["c"])
    assert asyncio.run(peer2.rpc_outer_vote(_vote(2, "c"), "c")).status == "pending"


def test_outer_rounds_show_in_metrics_and_the_status_page() -> None:
    from prometheus_client import generate_latest

    from coordinator.http import Metrics
    from pmnode.net.outer_report import OuterReport
    from pmnode.net.status import Replica, StageStatus, SwarmStatus

    outer = OuterReport(rounds=7, bytes_per_round=11139, round_s=0.5, hidden=0.9, refused={"size": 2})
    rep = Replica(peer_id="p1", stage=1, outer=outer, last_seen_s=0.0)
    stage = StageStatus(stage=1, role="body", layers=(2, 3), replicas=[rep], throughput=1.0)
    status = SwarmStatus(
        run="t", fingerprint=None, d_model=64, compression_rank=None, codec="c", schedule="async", n_stages=2,
        target_steps=10, global_step=1, stages=[stage], time=0.0,
    )  # fmt: skip
    m = Metrics()
    m.update(SwarmStatus.model_validate_json(status.model_dump_json()))  # as the page and scrapers get it
    text = generate_latest(m.registry).decode()
    assert 'pmnode_outer_bytes_per_round{peer="p1",stage="1"} 11139.0' in text
    assert 'pmnode_outer_hidden_fraction{peer="p1",stage="1"} 0.9' in text
    assert 'pmnode_outer_refused{peer="p1",reason="size",stage="1"} 2.0' in text


def _copied(jobs: Any) -> tuple[dict[str, torch.Tensor], StateMeta]:
    """What a state copy of `jobs`' replica carries of its outer state (no optimizer here)."""
    tensors, outer = jobs.state()
    return tensors, StateMeta(step=0, param_groups=[], outer=outer)


def _jobs(cfg: ReplicaSyncConfig, seed: int = 0) -> Any:
    from pmnode.swarm.outer_jobs import OuterJobs
    from pmnode.swarm.outer_peer import Counts

    torch.manual_seed(seed)
    stage = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    run = RunConfig.model_validate({"name": "t", "replica_sync": cfg.model_dump()})
    worker = SimpleNamespace(stage=stage)
    runner, schedule = SimpleNamespace(worker=worker), SimpleNamespace(averages=True)
    ctx = SimpleNamespace(cfg=run, runner=runner, schedule=schedule, say=lambda text: None)
    return OuterJobs(ctx, sample_cap(run), Counts())  # type: ignore[arg-type]


def test_a_copy_mid_round_lets_the_copier_apply_that_round_like_everyone() -> None:
    cfg = TOPK.model_copy(update={"outer_momentum": 0.9})
    a, c = _jobs(cfg, 0), _jobs(cfg, 1)  # a: the sender; c: another member, same starting weights
    for x, y in zip(a.params, c.params, strict=True):
        y.data.copy_(x.data)
    for j in (a, c):
        j.make()
        with torch.no_grad():
            for p in j.params:
                p.add_(torch.randn_like(p) * 0.1)
    share_a, _ = a.start()
    share_c, _ = c.start()  # round 0 in flight at both
    a.copyable = {0: {"a": share_a, "c": share_c}}
    tensors, meta = _copied(a)
    joiner = _jobs(cfg, 2)
    assert joiner.adopt(tensors, meta)
    assert joiner.round == 0 and sorted(p for p, _ in joiner.inherited) == ["a", "c"]
    for p, q in zip(joiner.params, a.outer.anchor, strict=True):
        assert torch.equal(p.detach(), q)  # the joiner starts at the last outer step
    got = dict(joiner.inherited)
    joiner.start()  # it joins the round in flight, too late to be a member: it observes it
    a.apply(True, [share_a, share_c])
    c.apply(True, [share_a, share_c])
    joiner.apply(False, [got["a"], got["c"]])
    assert all(torch.equal(x, y) for x, y in zip(a.outer.anchor, joiner.outer.anchor, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(c.outer.anchor, joiner.outer.anchor, strict=True))
    assert a.digest(anchor=True) == joiner.digest(anchor=True) == c.digest(anchor=True)


def _pair(cfg: ReplicaSyncConfig) -> tuple[Any, Any]:
    """Two replicas from the same weights, each with progress of its own since the anchor."""
    a, b = _jobs(cfg, 0), _jobs(cfg, 1)
    for x, y in zip(a.params, b.params, strict=True):
        y.data.copy_(x.data)
    for j in (a, b):
        j.make()
        with torch.no_grad():
            for p in j.params:
                p.add_(torch.randn_like(p) * 0.1)
    return a, b


def test_a_catch_up_copy_over_a_round_in_flight_applies_that_round_like_everyone() -> None:
    """sync: a replica behind the commit started the round (a share came) and is then caught up by a
    copy of the same round: it applies the round as the others do, keeping only what it trained since."""
    a, b = _pair(TOPK.model_copy(update={"outer_momentum": 0.9}))
    share_a, _ = a.start()
    share_b, _ = b.start()  # b's share holds its progress before the copy
    a.copyable = {0: {"a": share_a, "b": share_b}}
    assert b.adopt(*_copied(a)) and b.round == 0 and not b.in_flight()
    with torch.no_grad():
        since = [torch.randn_like(p) * 0.01 for p in b.params]
        for p, d in zip(b.params, since, strict=True):
            p.add_(d)  # the commit's step after the copy
    got = dict(b.inherited)
    assert a.apply(True, [share_a, share_b])
    assert b.apply(True, [got["a"], got["b"]])  # a member whose round start the copy replaced
    assert a.round == b.round == 1 and a.digest(anchor=True) == b.digest(anchor=True)
    for p, anchor, d in zip(b.params, b.outer.anchor, since, strict=True):
        assert torch.allclose(p.detach(), anchor + d, atol=1e-6)


def test_a_copy_past_the_round_in_flight_leaves_the_round_to_its_anchor_and_the_loop_goes_on() -> None:
    a, b = _pair(TOPK)
    share_a, _ = a.start()
    share_b, _ = b.start()
    assert a.apply(True, [share_a, share_b]) and a.round == 1
    assert b.adopt(*_copied(a)) and b.round == 1
    weights = b.digest()
    landed: list[bool] = []
    b.pending = (True, [share_a, share_b], lambda: landed.append(True))
    b.land()  # in the commit's step job: nothing applied, and the loop is told so
    assert landed == [True] and b.landed_ok is False and b.pending is None
    assert b.round == 1 and b.digest() == weights and b.digest(anchor=True) == a.digest(anchor=True)


@pytest.mark.parametrize("outer", [False, True])
def test_a_sync_catch_up_counts_each_sample_once(outer: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step method: every replica applies every head's batch, so a copy at step 5 has applied 5
    batches. Outer rounds: each replica steps on its own micro-batches only, so a replica that starts
    late and copies another at step 5 applied none of them (the other counted them)."""
    from pmnode.swarm import replicas as mod

    class Runner:
        samples_applied, batch, step = 0, 8, 0

        async def load_state(self, got: object, at_step: int | None = None) -> None:
            self.step = at_step or 0

        async def run(self, fn: Any, *args: Any) -> Any:
            return fn(*args)

    runner, adopted = Runner(), []
    ctx = SimpleNamespace(stage=1, runner=runner, console=SimpleNamespace(print=lambda *a, **k: None))
    got = SimpleNamespace(manifest=SimpleNamespace(meta={}), buffer=bytearray())

    async def fetch_state(peers: list[str], at_step: int | None = None) -> tuple[Any, str]:
        return got, peers[0]

    monkeypatch.setattr(mod, "unpack", lambda manifest, buffer: {})
    no = SimpleNamespace()
    reps = mod.Replicas(ctx, no, no, no, identity=no, guard=no)  # type: ignore[arg-type]
    reps.fetch_state = fetch_state  # type: ignore[method-assign]
    if outer:
        reps.adopted = lambda tensors, meta: adopted.append(meta)
    asyncio.run(reps.catch_up(5, ["peer-b"]))
    assert runner.step == 5 and adopted == ([{}] if outer else [])
    assert runner.samples_applied == (0 if outer else 5 * 8)
