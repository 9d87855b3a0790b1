"""Spot checks of compute (issue 25, item 5): the policy with fakes, and a real swarm with a liar.

The policy: which micro-batches are checked, when two outputs agree, who a third opinion names, what a
ban marks. The checker (pmnode.swarm.spot_checks) against fake replicas: a liar served or recomputed,
two replicas only, honest ones. Then `pmnode local-swarm` of 3 stages x 3 replicas, sync, with one
stage-1 replica corrupting every output it sends (PMNODE_TEST_LIE=1): it is banned in the first step
it serves, that step is computed again without it, and the run ends with the single process's losses.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from launch import BIN, assert_no_leftovers, kill_tagged, swarm_config, tagged_env

from pmnode.config import load_config
from pmnode.core.codecs import Int8Q, Packet
from pmnode.errors import PmnodeError
from pmnode.net.auth import Guard
from pmnode.net.envelope import MicroBatchId
from pmnode.net.jobs import off_loop
from pmnode.net.routing import StageRecord
from pmnode.net.wire import MessageHeader
from pmnode.swarm.handler import StageHandler
from pmnode.swarm.spot_checks import SpotChecker
from pmnode.swarm.spot_policy import MAX_BANNED, Ledger, Sampler, Verdict, decide, distance
from pmnode.swarm.spot_serve import Liar

TOL = 0.05


def _activation(seed: int = 0, b: int = 4, n: int = 16, k: int = 8) -> Packet:
    g = torch.Generator().manual_seed(seed)
    t = Int8Q(k).pack(torch.randn(b, n, k, generator=g))
    t["tokens"] = torch.randint(0, 256, (b, n), generator=g).to(torch.uint8)
    return Packet(t)


# ---- the policy ----------------------------------------------------------------------------------------
def test_sampler_checks_the_configured_fraction_and_none_at_zero() -> None:
    s = Sampler(0.05, random.Random(7))
    picks = sum(s.pick() for _ in range(20_000))
    assert 900 <= picks <= 1100  # 1,000 expected; sd 31
    assert not any(Sampler(0.0, random.Random(7)).pick() for _ in range(1000))
    assert all(Sampler(1.0, random.Random(7)).pick() for _ in range(1000))


def test_distance_tolerates_rounding_and_sees_a_lie() -> None:
    a = _activation()
    assert distance(a, a) == 0.0
    # int8 rounding on another machine: a few codes one step off
    q = a.tensors["q"].clone()
    q.view(-1)[:10] += torch.where(q.view(-1)[:10] < 127, 1, -1).to(torch.int8)
    rounded = Packet({**a.tensors, "q": q})
    assert 0 < distance(a, rounded) < 0.01
    lie = Liar(1.0, seed=0)(a)
    assert distance(a, lie) == pytest.approx(2.0, rel=1e-3)  # the sign flipped: twice the norm apart
    assert lie.tensors["tokens"] is a.tensors["tokens"]  # a quiet lie: same ids and layout
    other_tokens = Packet({**a.tensors, "tokens": a.tensors["tokens"] ^ 1})
    assert distance(a, other_tokens) == float("inf")
    assert distance(a, Packet({"q": q})) == float("inf")  # another layout
    assert distance(a, _activation(b=2)) == float("inf")


def test_liar_lies_on_its_fraction() -> None:
    liar, a = Liar(0.1, seed=3), _activation()
    told = [distance(a, liar(a)) > TOL for _ in range(5000)]
    assert sum(told) == liar.lies and 430 <= liar.lies <= 570  # 500 expected
    assert Liar(0.0)(a) is a


def test_third_opinion_names_the_liar() -> None:
    assert decide("A", "B", True) == Verdict("agree")
    assert decide("A", "B", False) == Verdict("undecided", named=("A", "B"))  # no third replica
    assert decide("A", "B", False, "C", ac=False, bc=True) == Verdict("liar", "A", ("A", "B"))
    assert decide("A", "B", False, "C", ac=True, bc=False) == Verdict("liar", "B", ("A", "B"))
    # C sides with neither (or both: it cannot, if A and B differ, unless the tolerance is loose)
    assert decide("A", "B", False, "C", ac=False, bc=False) == Verdict("undecided", named=("A", "B", "C"))
    assert decide("A", "B", False, "C", ac=True, bc=True).liar is None


def test_ledger_bans_once_marks_the_step_and_stays_bounded() -> None:
    led = Ledger()
    assert led.record(4, Verdict("liar", "A", ("A", "B")))
    assert not led.record(5, Verdict("liar", "A", ("A", "C")))  # banned already
    assert led.counts == {"liar": 2, "banned": 1}
    assert led.take_tainted(4) and not led.take_tainted(4) and not led.take_tainted(5)
    assert not led.record(7, Verdict("undecided", named=("B", "C")))  # no ban, but step 7 goes again
    assert led.take_tainted(7) and led.banned == {"A": 4}
    for i in range(MAX_BANNED + 10):
        led.record(6, Verdict("liar", f"p{i}", (f"p{i}", "B")))
    assert len(led.banned) == MAX_BANNED and "A" not in led.banned and f"p{MAX_BANNED + 9}" in led.banned


# ---- the checker against fake replicas -----------------------------------------------------------------
class FakeChecker(SpotChecker):
    """The real checker; `_ask` answers from fake replicas: honest ones compute f(x) = 2x, liars lie."""

    def __init__(self, liars: set[str], peers: list[str], rate: float = 1.0):
        cfg = load_config("tiny").with_overrides(n_stages=3, train={"batch_size": 8})
        ctx = SimpleNamespace(
            cfg=cfg,
            stage=0,
            schedule=SimpleNamespace(commits=True),
            console=SimpleNamespace(print=lambda *a, **k: None),
            say=lambda text: None,
            runner=SimpleNamespace(run=off_loop),  # the distances are the compute thread's jobs
        )
        records = [StageRecord(peer_id=p, stage=1, throughput=1.0) for p in peers]
        downstream = SimpleNamespace(records=records, rng=None)  # the first by peer id
        guard = Guard(None, 0, rate=1e6, burst=64, ban_after=20, ban_seconds=300.0)  # type: ignore[arg-type]
        super().__init__(ctx, downstream, guard, Sampler(rate, random.Random(1)))  # type: ignore[arg-type]
        self.liars, self.asked = liars, []
        self.lie = Liar(1.0)

    async def _ask(self, peer: str, op: str, mb: MicroBatchId, packet: Packet) -> Packet | None:
        self.asked.append((peer, op))
        x = _activation(seed=mb.index)
        out = Packet({**x.tensors, "q": (x.tensors["q"] // 2)})  # what an honest replica sends
        return self.lie(out) if peer in self.liars else out


def _check(checker: FakeChecker, a: str, index: int = 0) -> Verdict:
    return asyncio.run(checker.check(MicroBatchId(3, index), _activation(), a))


def test_a_liar_that_served_is_banned_by_the_third_opinion() -> None:
    c = FakeChecker({"A"}, ["A", "B", "C"])
    banned: list[str] = []
    c.on_ban = banned.append
    v = _check(c, "A")
    assert v == Verdict("liar", "A", ("A", "B"))
    assert c.asked == [("A", "sent"), ("B", "compute"), ("C", "compute")]
    assert banned == ["A"] and c.banned() == ["A"] and "A" in c.guard.banned  # the guard's own ban
    assert c.guard.bans == 1 and c.guard.ban_after == 20 and c.guard.admit("A") == "banned"
    assert c.ledger.take_tainted(3)  # step 3 is computed again before it is applied
    # from now on A is neither a second nor a third opinion
    c.asked.clear()
    assert _check(c, "B").outcome == "agree" and ("A", "compute") not in c.asked


def test_the_head_counts_what_a_liar_served_until_its_ban() -> None:
    c = FakeChecker({"A"}, ["A", "B", "C"], rate=0.0)

    async def serve() -> None:
        for i in range(3):  # served, not checked
            c.start(MicroBatchId(1, i), _activation(), "A")
        c.start(MicroBatchId(1, 3), _activation(), "B")
        c.sampler.rate = 1.0
        c.start(MicroBatchId(1, 4), _activation(), "A")  # checked: caught
        await c.settle()
        c.start(MicroBatchId(1, 5), _activation(), "B")

    asyncio.run(serve())
    assert c.report()["served_until_ban"] == {"A": 4} and c.served == {"A": 4, "B": 2}


def test_a_liar_asked_to_recompute_is_banned_too() -> None:
    c = FakeChecker({"B"}, ["A", "B", "C"])
    c.downstream.records.sort(key=lambda r: r.peer_id != "B")  # B is the second opinion
    v = _check(c, "A")
    assert v.liar == "B" and c.banned() == ["B"]


def test_two_replicas_disagreeing_name_both_and_ban_neither() -> None:
    c = FakeChecker({"A"}, ["A", "B"])
    v = _check(c, "A")
    assert v == Verdict("undecided", named=("A", "B"))
    assert c.banned() == [] and not c.guard.banned and c.ledger.counts["undecided"] == 1


def test_honest_replicas_agree_and_nothing_is_marked() -> None:
    c = FakeChecker(set(), ["A", "B", "C"])
    assert [_check(c, "A", i).outcome for i in range(5)] == ["agree"] * 5
    assert c.banned() == [] and not c.ledger.tainted and ("C", "compute") not in c.asked


def test_checks_are_off_where_replicas_hold_different_weights() -> None:
    c = FakeChecker(set(), ["A", "B", "C"])
    assert c.enabled
    c.ctx.schedule.commits = False  # async: replicas step apart
    assert not SpotChecker(c.ctx, c.downstream, c.guard).enabled  # type: ignore[arg-type]
    outer = c.ctx.cfg.with_overrides(replica_sync={"method": "outer"})
    c.ctx.schedule.commits, c.ctx.cfg = True, outer
    assert not SpotChecker(c.ctx, c.downstream, c.guard).enabled  # type: ignore[arg-type]
    c.ctx.cfg = outer.with_overrides(replica_sync={"method": "step"}, n_stages=2)
    assert not SpotChecker(c.ctx, c.downstream, c.guard).enabled  # type: ignore[arg-type]  # stage 1 is the tail


# ---- a real swarm with a liar --------------------------------------------------------------------------
STEPS_E2E, REPLICAS = 12, 3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_replica_lying_on_every_micro_batch_is_banned_and_the_run_goes_on(
    tmp_path: Path, toy_corpus: Path
) -> None:
    cfg = swarm_config(
        tmp_path, toy_corpus, train={"steps": STEPS_E2E, "eval_every": 6}, trust={"spot_check_rate": 1.0}
    )
    tag = uuid.uuid4().hex
    env = {**tagged_env(tag), "PMNODE_TEST_LIE": "1.0", "PMNODE_TEST_LIE_NODE": "node-1-2"}
    work = tmp_path / "work"
    args = ["--config", str(cfg), "--stages", "3", "--replicas", str(REPLICAS), "--schedule", "sync"]
    args += ["--workdir", str(work), "--summary-json", str(tmp_path / "swarm.json")]
    try:
        swarm = subprocess.run(
            [str(BIN / "pmnode"), "local-swarm", *args], capture_output=True, text=True, timeout=800, env=env
        )
        assert swarm.returncode == 0, swarm.stderr[-3000:]
        single = subprocess.run(
            [
                str(BIN / "pmnode"),
                "train",
                "--config",
                str(cfg),
                "--summary-json",
                str(tmp_path / "ref.json"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert single.returncode == 0, single.stderr[-3000:]
    finally:
        kill_tagged(tag)
    nodes = {p.stem: json.loads(p.read_text()) for p in work.glob("node-*.json")}
    head, liar = nodes["node-0"]["spot_checks"], nodes["node-1-2"]["spot_checks"]
    print(json.dumps({"head": head, "liar": liar}))
    assert liar["lies"] >= 1
    assert list(head["banned"]) == [liar["peer_id"]]  # the liar, and nobody else
    # caught once (a check before the third replica is up and at the step names both, bans nobody and
    # has the step computed again)
    assert head["counts"]["liar"] >= 1 and head["counts"]["banned"] == 1  # checks in flight may all see it
    caught = head["banned"][liar["peer_id"]]
    redone, undecided = head["steps_redone"], head["counts"].get("undecided", 0)
    assert caught in redone and len(redone) <= 1 + undecided
    # caught in the first step it served (or, as a second opinion, before it served any)
    assert head["served_until_ban"][liar["peer_id"]] <= 2 * len(redone)
    assert all(n["process_cpu_s"] > 0 for n in nodes.values())
    assert head["counts"]["agree"] >= STEPS_E2E  # the honest replicas kept being checked, and agreed
    assert head["agree_distance_max"] is not None and head["agree_distance_max"] < 1e-3
    # the run went on to the end, and every step applied was computed without the liar: the losses are
    # the single process's (a step computed again reports the training loss of its first, bent pass),
    # and so is the held-out loss
    swarm_run = json.loads((tmp_path / "swarm.json").read_text())
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert len(swarm_run["train_losses"]) == len(ref["train_losses"]) == STEPS_E2E
    for step, (a, b) in enumerate(zip(swarm_run["train_losses"], ref["train_losses"], strict=True)):
        if step not in head["steps_redone"]:
            assert abs(a - b) / b <= 1e-4, f"step {step}: swarm {a} vs single {b}"
    assert swarm_run["heldout_loss"] == pytest.approx(ref["heldout_loss"], rel=1e-4)
    for name, n in nodes.items():
        if name != "node-1-2" and n["stage"] > 0:
            assert (n["steps"], n["samples_off"]) == (STEPS_E2E, 0), name
    assert yaml.safe_load(cfg.read_text())["trust"]["spot_check_rate"] == 1.0
    assert_no_leftovers(tag)


# ---- an evaluation meets the weights of the caller's step ----------------------------------------------
class _Runner:
    """What StageHandler.rpc_eval asks of the runner before it evaluates."""

    def __init__(self, step: int):
        self.step, self.frontier = step, step
        self.worker = SimpleNamespace(is_last=True)  # the payload's check ran where it was decoded


def _eval_handler(step: int, commits: bool = True, applies_to: int | None = None) -> StageHandler:
    cfg = load_config("tiny").with_overrides(n_stages=3)
    ctx = SimpleNamespace(cfg=cfg, stage=2, runner=_Runner(step), schedule=SimpleNamespace(commits=commits))
    handler = StageHandler(ctx, None, None, lambda: None)  # type: ignore[arg-type]

    async def reach(target: int, timeout: float) -> bool:  # the participant's wait for an apply
        if applies_to is not None:
            ctx.runner.step = applies_to
        return ctx.runner.step >= target

    handler.reach = reach
    return handler


def test_a_replica_at_another_step_refuses_an_evaluation_under_sync() -> None:
    """The held-out loss of a sync run is of the weights every replica holds after the last commit. A
    replica left behind (it missed commits, or joined and had none yet: its random init) refuses, not as
    a strike, and the caller evaluates through another: one such replica of stage 2 at step 1, serving
    two of four held-out batches at step 12, made a swarm's held-out loss 4.5957 for 3.7875."""
    header = MessageHeader(kind="activation", run="tiny", micro_batch="eval:0", stage=1, step=12)
    with pytest.raises(PmnodeError, match="evaluation of step 12: this replica is at step 1"):
        asyncio.run(_eval_handler(1).rpc_eval(header, Packet({}), "caller"))
    asyncio.run(_eval_handler(12)._at_callers_step(header))  # at the step: evaluates
    asyncio.run(_eval_handler(11, applies_to=12)._at_callers_step(header))  # its apply lands meanwhile
    asyncio.run(_eval_handler(1, commits=False)._at_callers_step(header))  # async: replicas step apart
