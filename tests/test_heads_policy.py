"""Several heads, the pure parts: slot ids, who leads the sync commit, the commit's accounting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pmnode.config import RunConfig
from pmnode.net.control import Prepared
from pmnode.net.routing import StageRecord
from pmnode.swarm.commit import tally
from pmnode.swarm.heads import HeadGroup, slot_ids, slot_of


def _group(slot: int, records: list[StageRecord], heads: int = 3) -> HeadGroup:
    cfg = RunConfig.model_validate(
        {
            "name": "t",
            "model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2},
            "train": {"batch_size": 8, "micro_batch_size": 4},
            "swarm": {"heads": heads},
        }
    )
    ctx = SimpleNamespace(
        cfg=cfg, p2p=None, tunnel=None, peer_id="me", slot=slot, runner=SimpleNamespace(step=10)
    )
    view = SimpleNamespace(members={0: records})
    return HeadGroup(ctx, view)  # type: ignore[arg-type]


def _head(peer: str, slot: int, since: int | None, step: int = 10, state: str = "online") -> StageRecord:
    return StageRecord(peer_id=peer, stage=0, slot=slot, driving_since=since, step=step, state=state)  # type: ignore[arg-type]


def test_slot_ids_never_collide_and_name_their_slot() -> None:
    ids = [slot_ids(7, h, 2) for h in range(3)]
    assert ids == [["7:0", "7:1"], ["7:2", "7:3"], ["7:4", "7:5"]]
    assert [slot_of(i, 2) for slot in ids for i in slot] == [0, 0, 1, 1, 2, 2]


def test_the_earliest_driver_leads_and_a_joiner_never_takes_the_lead() -> None:
    g = _group(1, [_head("a", 0, 0), _head("me", 1, 0)])
    g.since = 0
    assert not g.leads()  # same start: the lower slot leads
    g = _group(1, [_head("a", 0, None, step=0)])  # a joiner on the freed slot 0, waiting to be brought in
    g.since = 0
    assert g.leads()
    g = _group(1, [_head("a", 0, 11)])  # brought in at step 11: still not the leader
    g.since = 0
    assert g.leads()
    g = _group(0, [_head("b", 1, 0)])  # the joiner itself defers to the elder head
    g.since = 11
    assert not g.leads()
    g = _group(0, [_head("b", 1, 0, state="offline")])  # ...until the elder is gone
    g.since = 11
    assert g.leads() and g.others() == []


def test_ready_waits_for_the_heads_own_batch_unless_it_is_not_driving() -> None:
    async def scenario() -> list[str]:
        g = _group(0, [])
        seen: list[str] = []

        async def prepare() -> None:
            await g.ready(3)
            seen.append("summed")

        task = asyncio.create_task(prepare())
        await asyncio.sleep(0.05)
        seen.append("drained")
        await g.drained(3)
        await task
        await g.set_driving(False)
        await asyncio.wait_for(g.ready(99), 1.0)  # not driving: nothing to wait for
        return seen

    assert asyncio.run(scenario()) == ["drained", "summed"]


def test_a_micro_batch_of_a_dead_head_is_counted_as_extra() -> None:
    """Stage 0's tally gives the step's batch: the live heads' micro-batches; a later stage that also
    holds the dead head's is told apart (the commit starts that stage's step over)."""
    heads = tally(["a", "b"], [Prepared(ok=True, own=["5:0", "5:1"]), TimeoutError()])
    assert heads.failed == {"b"} and heads.held == {"5:0", "5:1"}
    stage = tally(["c"], [Prepared(ok=True, own=["5:0", "5:1", "5:2", "5:3"])])
    assert stage.held - heads.held == {"5:2", "5:3"} and not stage.twice
