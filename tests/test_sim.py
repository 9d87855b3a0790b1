"""The swarm simulator against cases whose answer is known by hand."""

from __future__ import annotations

import pytest

from pmnode.sim.events import Engine, Server
from pmnode.sim.model import NodeSpec, StageSpec, SwarmSpec, SyncSpec
from pmnode.sim.swarm import SwarmSim


def spec(stages: list[StageSpec], **kw: object) -> SwarmSpec:
    base: dict = {"tokens_per_micro_batch": 100, "fwd_bytes_per_token": 0, "bwd_bytes_per_token": 0}
    return SwarmSpec(stages=stages, **{**base, **kw})


def test_server_is_fifo_and_serial() -> None:
    eng, done = Engine(), []
    srv = Server(eng)
    for name, secs in (("a", 2.0), ("b", 1.0), ("c", 0.5)):
        srv.submit(secs, lambda name=name: done.append((name, eng.now)))
    eng.run()
    assert done == [("a", 2.0), ("b", 3.0), ("c", 3.5)]
    assert srv.busy_s == 3.5


def test_compute_bound_pipeline() -> None:
    # Two stages; the tail's 30 ms job is the slowest: 100 tokens / 0.03 s.
    s = spec([StageSpec(fwd_s=0.01, bwd_s=0.02), StageSpec(fwd_s=0, bwd_s=0.03)], max_inflight=8)
    r = SwarmSim(s).run(200)
    assert r.tokens_per_s == pytest.approx(100 / 0.03, rel=1e-4)
    assert r.binding == "compute, stage 1"
    assert r.stages[1].utilisation == pytest.approx(1.0, abs=0.01)


def test_one_micro_batch_in_flight_is_the_round_trip() -> None:
    # Window 1: every micro-batch waits for the last; round trip 10 + 30 + 20 ms + 2 x 50 ms latency.
    far = [NodeSpec(latency=0.05)]
    s = spec(
        [StageSpec(fwd_s=0.01, bwd_s=0.02, nodes=far), StageSpec(fwd_s=0, bwd_s=0.03, nodes=far)],
        max_inflight=1,
    )
    r = SwarmSim(s).run(50)
    assert r.tokens_per_s == pytest.approx(100 / 0.16, rel=1e-4)
    assert r.binding == "latency and the in-flight window"


def test_link_bound() -> None:
    # 1,000 B/token forward at 1 MB/s: 0.1 s per micro-batch of 100 tokens on the link.
    nodes = [NodeSpec(bandwidth=1e6, latency=0.05)]
    s = spec(
        [StageSpec(fwd_s=0.01, bwd_s=0.02, nodes=nodes), StageSpec(fwd_s=0, bwd_s=0.03, nodes=nodes)],
        max_inflight=8,
        fwd_bytes_per_token=1000,
        bwd_bytes_per_token=100,
    )
    r = SwarmSim(s).run(100)
    assert r.tokens_per_s == pytest.approx(1000.0, rel=1e-4)
    assert r.binding == "link 0->1"


def test_sync_drains_every_step() -> None:
    # Two micro-batches per step: head fwd 0-10, 10-20 ms; tail 10-40, 40-70; head bwd 40-60, 70-90.
    s = spec(
        [StageSpec(fwd_s=0.01, bwd_s=0.02, step_s=0.005), StageSpec(fwd_s=0, bwd_s=0.03, step_s=0.005)],
        schedule="sync",
        max_inflight=8,
        micro_batches_per_step=2,
    )
    r = SwarmSim(s).run(50)
    assert r.step_s == pytest.approx(0.095, rel=1e-4)  # 90 ms and the 5 ms step
    assert r.tokens_per_s == pytest.approx(200 / 0.095, rel=1e-4)


def test_replicas_share_by_the_routing_policy() -> None:
    # The tail has two replicas, one twice as fast. The policy weighs each by its announced throughput
    # over the micro-batches the sender has in flight there (its own count, not the heartbeat-old
    # queue, which let every micro-batch of a heartbeat pile onto one replica and the pair do no
    # better than the fast one alone): they serve in the ratio of their speeds, and the pair does
    # what both together can, 100 tokens / 60 ms + 100 tokens / 30 ms.
    tail = StageSpec(fwd_s=0, bwd_s=0.06, nodes=[NodeSpec(speed=1.0), NodeSpec(speed=2.0)])
    sim = SwarmSim(spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=16))
    r = sim.run(1000)
    slow, fast = (n.served for n in sim.nodes[1])
    assert fast / slow == pytest.approx(2.0, rel=0.05)
    assert r.tokens_per_s == pytest.approx(100 / 0.06 + 100 / 0.03, rel=0.03)
    assert r.stages[1].busiest_share == pytest.approx(2 / 3, rel=0.03)


def test_a_replica_dies_and_its_micro_batches_go_elsewhere() -> None:
    tail = StageSpec(fwd_s=0, bwd_s=0.02, nodes=[NodeSpec(), NodeSpec(leave_at=1.0)])
    s = spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=8, retry_s=0.5)
    sim = SwarmSim(s)
    r = sim.run(400)
    assert r.retried > 0
    assert r.steps == 400  # nothing lost: every micro-batch finished
    assert r.stages[1].nodes == 1
    # After the death the one replica left bounds the rate: 100 tokens per 20 ms.
    late = [t for t in sim.done_at if t > 3.0]
    assert (len(late) - 1) / (late[-1] - late[0]) == pytest.approx(50.0, rel=0.02)


def test_a_joiner_takes_load() -> None:
    tail = StageSpec(fwd_s=0, bwd_s=0.02, nodes=[NodeSpec(), NodeSpec(join_at=2.0)])
    sim = SwarmSim(spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=8))
    sim.run(600)
    assert sim.nodes[1][1].served > 100
    late = [t for t in sim.done_at if t > 5.0]
    assert (len(late) - 1) / (late[-1] - late[0]) > 0.95 * 50  # at least one replica's 50/s (see above)


def test_every_head_keeps_its_own_window() -> None:
    # As the window test above, with two heads and two tail replicas: each head has its own one
    # micro-batch in flight, so the swarm does twice one head's 100 tokens per 0.16 s.
    far = [NodeSpec(latency=0.05)] * 2
    s = spec(
        [StageSpec(fwd_s=0.01, bwd_s=0.02, nodes=far), StageSpec(fwd_s=0, bwd_s=0.03, nodes=far)],
        max_inflight=1,
    )
    sim = SwarmSim(s)
    r = sim.run(100)
    assert r.tokens_per_s == pytest.approx(2 * 100 / 0.16, rel=0.02)
    assert all(h.served > 0.45 * 2 * 100 for h in sim.nodes[0])  # both heads drove their share


def test_a_round_that_does_not_land_in_time_holds_its_replica() -> None:
    # Two tail replicas at 50 micro-batches/s each (100/s together); each sends 0.5 MB every 10 steps
    # on a 1 MB/s uplink: 0.5 s a round against 0.1 s of steps, so rounds set the pace: 10 steps
    # (1,000 tokens) per 0.5 s.
    tail = StageSpec(
        fwd_s=0, bwd_s=0.02, nodes=[NodeSpec(bandwidth=1e6)] * 2, sync=SyncSpec(bytes_up=5e5, every_steps=10)
    )
    r = SwarmSim(spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=8)).run(300)
    assert r.tokens_per_s == pytest.approx(1000 / 0.5, rel=0.05)
    assert r.binding == "replica sync, stage 1"
    assert r.stages[1].sync_round_s == pytest.approx(0.5, rel=0.01)
    assert r.stages[1].sync_waited > 0.5
    # Every 100 steps the same round hides (1 s of steps or more): the swarm is as fast as without.
    tail.sync = None
    free = SwarmSim(spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=8)).run(1000)
    tail.sync = SyncSpec(bytes_up=5e5, every_steps=100)
    r = SwarmSim(spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], max_inflight=8)).run(1000)
    assert r.tokens_per_s == pytest.approx(free.tokens_per_s, rel=0.02)
    assert r.stages[1].sync_waited < 0.01


def test_a_sync_commit_waits_for_the_exchange() -> None:
    # sync, one micro-batch a step: 3 ms of compute, then the two tail replicas exchange 1 MB at 1 MB/s.
    tail = StageSpec(fwd_s=0, bwd_s=0.001, nodes=[NodeSpec(bandwidth=1e6)] * 2,
                     sync=SyncSpec(bytes_up=1e6, every_steps=1, mode="commit"))  # fmt: skip
    s = spec([StageSpec(fwd_s=0.001, bwd_s=0.001), tail], schedule="sync")
    assert SwarmSim(s).run(20).step_s == pytest.approx(1.003, rel=1e-3)
