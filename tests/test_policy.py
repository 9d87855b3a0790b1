"""The node's policy without a network: commit accounting, pauses, step-if-ready, the replay window,
averaging round acceptance and the schedules, with fakes where the parts would talk to peers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.errors import PmnodeError
from pmnode.net.auth import Verifier, issue_cert, public_bytes
from pmnode.net.control import Ack, Applied, Apply, Prepare, Prepared, Reset
from pmnode.net.envelope import MicroBatchId
from pmnode.net.routing import StageRecord
from pmnode.swarm.average_loop import all_final, judge_round
from pmnode.swarm.commit import MAX_REDOS, StepCommit, live_peers, tally
from pmnode.swarm.membership import empty_stages
from pmnode.swarm.pauses import PauseClock, Pauses
from pmnode.swarm.replay import ReplayWindow
from pmnode.swarm.runner import Checkpoints, StageRunner, needs_step
from pmnode.swarm.schedule import ASYNC, SYNC, schedule_named

CFG = RunConfig.model_validate(
    {
        "n_stages": 3,
        "model": {"n_layers": 6},
        "train": {"batch_size": 8, "micro_batch_size": 2, "steps": 10},
    }
)
QUIET = Console(quiet=True)


def rec(peer: str, stage: int, state: str = "online") -> StageRecord:
    return StageRecord(peer_id=peer, stage=stage, state=state)  # type: ignore[arg-type]


# ---- commit accounting ------------------------------------------------------------------------------
def test_tally_counts_lost_held_and_twice() -> None:
    replies: list[Prepared | BaseException] = [
        Prepared(ok=True, own=["3:0", "3:1"]),
        Prepared(ok=True, own=["3:1", "3:2"]),
        TimeoutError("gone"),
    ]
    t = tally(["a", "b", "c"], replies)
    assert t.failed == {"c"} and t.held == {"3:0", "3:1", "3:2"} and t.twice == {"3:1"}


def test_tally_drops_what_an_unreachable_peer_held() -> None:
    replies: list[Prepared | BaseException] = [
        Prepared(ok=False, own=["3:0"], unreachable=["b"]),
        Prepared(ok=True, own=["3:1"]),
    ]
    t = tally(["a", "b"], replies)
    assert t.failed == {"b"} and t.held == {"3:0"} and t.twice == set()  # b's micro-batch must come again


def test_live_peers_forget_failures_after_a_while() -> None:
    members = {1: ["a", "b"], 2: ["c"]}
    assert live_peers(members, {"a": 100.0}, now=105.0) == {1: ["b"], 2: ["c"]}
    assert live_peers(members, {"a": 100.0}, now=111.0) == {1: ["a", "b"], 2: ["c"]}


class FakeClient:
    """The head's typed client, answering from a script instead of the network."""

    def __init__(self, owns: dict[str, list[list[str]]]):
        self.owns = owns  # peer -> what it holds at each successive prepare
        self.calls: list[tuple[str, str, BaseModel]] = []

    async def call(self, rpc: Any, peer: str, request: BaseModel, timeout: float = 10.0) -> BaseModel:
        self.calls.append((rpc.name, peer, request))
        if isinstance(request, Prepare):
            held = self.owns[peer].pop(0) if len(self.owns[peer]) > 1 else self.owns[peer][0]
            return Prepared(ok=True, own=held, samples=2 * len(held))
        if isinstance(request, Apply):
            return Applied(step=request.step + 1, samples=8)
        assert isinstance(request, Reset)
        return Ack()


def _commit(members: dict[int, list[str]], owns: dict[str, list[list[str]]]):
    view = SimpleNamespace(
        members={s: [rec(p, s) for p in ps] for s, ps in members.items()}, empty=lambda: [], refresh=None
    )
    stepped: list[bool] = []

    async def step_if_ready() -> None:
        stepped.append(True)

    runner = SimpleNamespace(step_if_ready=step_if_ready, slot_positions={}, data_positions={})
    ctx = SimpleNamespace(
        cfg=CFG, console=QUIET, p2p=None, tunnel=None, runner=runner, slot=0, peer_id="head"
    )
    downstream = SimpleNamespace(greet=lambda peer, stage: asyncio.sleep(0))
    resent: list[list[str]] = []

    async def resend(step: int, ids: list[str]) -> None:
        resent.append(ids)

    # One head: the head's micro-batches only (pmnode.swarm.heads; several heads: tests/test_heads*.py)
    heads = SimpleNamespace(many=False, others=lambda: [], failed_at={}, resend=resend)
    commit = StepCommit(ctx, view, downstream, lambda: asyncio.sleep(0), heads, None)  # type: ignore[arg-type]
    commit.client = FakeClient(owns)  # type: ignore[assignment]
    return commit, resent, stepped


def test_commit_applies_once_every_stage_holds_every_micro_batch() -> None:
    batch = ["3:0", "3:1", "3:2", "3:3"]
    commit, resent, stepped = _commit(
        {1: ["a", "b"], 2: ["c"]}, {"a": [batch[:2]], "b": [batch[2:]], "c": [batch]}
    )
    asyncio.run(commit.commit(3, batch))
    calls = [(name, peer) for name, peer, _ in commit.client.calls]  # type: ignore[attr-defined]
    assert sorted(c for c in calls if c[0] == "apply") == [("apply", "a"), ("apply", "b"), ("apply", "c")]
    assert resent == [] and stepped == [True] and commit.reissued == 0


def test_commit_resends_what_no_replica_holds_before_applying() -> None:
    batch = ["3:0", "3:1"]
    # Stage 1's only replica lost 3:1 (its other replica died after answering); the re-send brings it.
    commit, resent, stepped = _commit({1: ["a"], 2: ["c"]}, {"a": [["3:0"], batch], "c": [batch]})
    asyncio.run(commit.commit(3, batch))
    assert resent == [["3:1"]] and commit.reissued == 1 and stepped == [True]
    names = [name for name, _, _ in commit.client.calls]  # type: ignore[attr-defined]
    assert names.index("apply") > len(names) - 3  # nothing applied before the second prepare


def test_commit_resets_a_stage_that_holds_a_micro_batch_twice() -> None:
    batch = ["3:0", "3:1"]
    owns = {"a": [["3:0", "3:1"], ["3:0"]], "b": [["3:1"], ["3:1"]], "c": [batch]}
    commit, resent, _ = _commit({1: ["a", "b"], 2: ["c"]}, owns)
    asyncio.run(commit.commit(3, batch))
    resets = [peer for name, peer, _ in commit.client.calls if name == "reset"]  # type: ignore[attr-defined]
    assert sorted(resets) == ["a", "b"] and resent == [batch]  # the whole step again


async def _noop() -> None:
    return None


def _spot_checked(commit: StepCommit, settle: Any, banned: Any, take_tainted: Any) -> list[str]:
    """Give `commit` a fake spot checker and a runner that records its jobs' names (returned)."""
    jobs: list[str] = []

    async def run(fn: Any, *args: Any) -> None:
        jobs.append(fn.__name__)

    commit.ctx.runner.run = run

    def forget(step: int) -> None:  # named: the recorded jobs are named after their function
        return None

    commit.ctx.runner.worker = SimpleNamespace(forget=forget)
    commit.downstream.refresh = _noop
    commit.spot = SimpleNamespace(  # type: ignore[assignment]
        settle=settle, banned=banned, ledger=SimpleNamespace(take_tainted=take_tainted)
    )
    return jobs


def test_a_step_that_spot_checks_never_clear_is_dropped_not_applied() -> None:
    """Two replicas keep disagreeing and no third can say who lied: after MAX_REDOS computations of
    the step its batch is dropped everywhere (Apply(drop=True)), and nothing of it reaches a weight."""
    batch = ["3:0", "3:1"]
    owns = {"a": [batch[:1]], "b": [batch[1:]], "c": [batch]}  # stage 1's replicas share the batch
    commit, resent, stepped = _commit({1: ["a", "b"], 2: ["c"]}, owns)
    jobs = _spot_checked(commit, _noop, lambda: [], lambda step: True)
    asyncio.run(commit.commit(3, batch))
    assert commit.redone == [3] * MAX_REDOS and resent == [batch] * MAX_REDOS  # computed again, each time
    assert commit.dropped == [3] and stepped == []  # the head made no step from it...
    assert jobs == ["forget"] * MAX_REDOS + ["drop_step"]  # ...only dropped its gradients
    applies = [r for name, _, r in commit.client.calls if name == "apply"]  # type: ignore[attr-defined]
    assert len(applies) == 3 and all(isinstance(a, Apply) and a.drop and a.samples == 0 for a in applies)


def test_a_liar_banned_at_the_redo_cap_gets_one_clean_pass_not_bent_gradients() -> None:
    """MAX_REDOS undecided disagreements, then a third replica names the liar: the step is computed once
    more without it and applied (CI caught the head applying that last, bent pass: the drop it had
    decided was forgotten when the pass had to be re-sent)."""
    batch = ["3:0", "3:1"]
    owns = {"a": [batch[:1]], "b": [batch[1:]], "c": [batch]}
    commit, resent, stepped = _commit({1: ["a", "b"], 2: ["c"]}, owns)
    passes = iter([True] * (MAX_REDOS + 1) + [False] * 10)  # tainted until the liar is out, then clean
    banned: list[str] = []

    async def settle() -> None:  # the pass's verdicts are in before the head counts it
        if len(commit.redone) == MAX_REDOS and not banned:
            banned.append("x")  # the third replica decided: a liar (not a member of these stages)

    def take_tainted(step: int) -> bool:
        return next(passes)

    jobs = _spot_checked(commit, settle, lambda: list(banned), take_tainted)
    asyncio.run(commit.commit(3, batch))
    assert commit.redone == [3] * (MAX_REDOS + 1) and resent == [batch] * (MAX_REDOS + 1)
    assert commit.dropped == [] and stepped == [True]  # the clean pass was applied
    assert jobs == ["forget"] * (MAX_REDOS + 1)
    applies = [r for name, _, r in commit.client.calls if name == "apply"]  # type: ignore[attr-defined]
    assert len(applies) == 3 and not any(a.drop for a in applies) and all(a.samples == 4 for a in applies)


# ---- pauses ----------------------------------------------------------------------------------------------
def test_empty_stages_ignore_offline_records() -> None:
    members = {1: [rec("a", 1, "offline")], 2: [rec("c", 2)]}
    assert empty_stages(members, 3) == [1]
    assert empty_stages({}, 3) == [1, 2]


def test_pause_clock_says_so_every_30_s_and_gives_up_at_the_limit() -> None:
    clock = PauseClock(started=100.0, limit=45.0)
    assert clock.should_say(100.0) and not clock.should_say(120.0) and clock.should_say(131.0)
    assert not clock.exceeded(145.0) and clock.exceeded(146.0)
    assert not PauseClock(started=0.0, limit=0.0).exceeded(1e9)  # 0: for ever


class FakeView:
    """Stage 1 comes back after `after` refreshes."""

    def __init__(self, after: int):
        self.after, self.refreshes = after, 0
        self.members: dict[int, list[StageRecord]] = {1: [], 2: [rec("c", 2)]}

    def empty(self) -> list[int]:
        return empty_stages(self.members, 3)

    async def refresh(self, stages: list[int] | None = None) -> None:
        self.refreshes += 1
        if self.refreshes >= self.after:
            self.members[1] = [rec("b", 1)]


def _pauses(view: FakeView, limit: float) -> tuple[Pauses, list[bool]]:
    resumed: list[bool] = []

    async def on_resume() -> None:
        resumed.append(True)

    cfg = CFG.with_overrides(swarm={"pause_limit": limit})
    ctx = SimpleNamespace(cfg=cfg, console=QUIET, runner=SimpleNamespace(step=7))
    return Pauses(ctx, view, on_resume), resumed  # type: ignore[arg-type]


def test_pause_resumes_when_a_node_joins(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s: real_sleep(0))
    pauses, resumed = _pauses(FakeView(after=3), limit=0)

    async def two_waiters() -> None:  # every waiting micro-batch shares one pause
        await asyncio.gather(pauses.wait_whole(), pauses.wait_whole())

    asyncio.run(two_waiters())
    assert resumed == [True] and pauses.paused_s >= 0


def test_pause_stops_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    now = iter(range(0, 10_000, 10))
    monkeypatch.setattr("pmnode.swarm.pauses.time.monotonic", lambda: float(next(now)))
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda s: real_sleep(0))
    pauses, resumed = _pauses(FakeView(after=10**9), limit=25.0)
    with pytest.raises(PmnodeError, match="pause_limit"):
        asyncio.run(pauses.wait_whole())
    assert resumed == []


# ---- step-if-ready -------------------------------------------------------------------------------------
class FakeWorker:
    def __init__(self) -> None:
        self.samples_ready, self.step_count, self.index = 0, 0, 1
        self.is_first = False
        self.steps: list[int | None] = []

    def step(self, total: int | None = None, lr_step: int | None = None) -> tuple[int, float]:
        self.steps.append(lr_step)
        applied, self.samples_ready = self.samples_ready, 0
        self.step_count += 1
        return applied, 0.001


def test_needs_step() -> None:
    assert not needs_step(6, 8) and needs_step(8, 8) and needs_step(9, 8) and needs_step(0, 8, force=True)


def test_step_if_ready_counts_what_it_applied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved: list[int] = []
    monkeypatch.setattr(
        "pmnode.swarm.runner.checkpoint.save",
        lambda w, root, run, samples, data=None, slots=None, keep_newer=False: saved.append(w.step_count),
    )
    monkeypatch.setattr("pmnode.swarm.runner.checkpoint.save_run_config", lambda cfg, root: None)
    worker = FakeWorker()
    runner = StageRunner(worker, CFG, ASYNC, Checkpoints(tmp_path, every=2), pool=None)  # type: ignore[arg-type]
    worker.samples_ready = 6
    assert runner._step_if_ready() is None and worker.steps == []
    worker.samples_ready = 8
    assert runner._step_if_ready() == (8, 0.001)
    worker.samples_ready = 10  # a retry counted twice somewhere: the step shows it
    runner.replicated, runner.frontier = True, 5  # an async replica follows the head's step
    runner._step_if_ready()
    assert runner.samples_applied == 18 and runner.samples_off == 2 and runner.since_average == 18
    assert worker.steps == [None, 5] and saved == [2]  # a checkpoint every 2nd step, on this thread
    assert runner._step_if_ready(force=True) == (0, 0.001)  # a commit steps even with nothing


# ---- the replay window ---------------------------------------------------------------------------------
def test_replay_window_refuses_a_try_twice_and_forgets_old_ids() -> None:
    w = ReplayWindow(max_inflight=1)
    first = MicroBatchId(0, 0)
    w.remember(first, ref_step=0)
    assert w.taken(first) and not w.taken(first.retried(7))
    w.remember(first.retried(7), ref_step=0)
    assert w.seen["0:0"] == {0, 7}
    for step in range(1, 80):
        w.remember(MicroBatchId(step, 0), ref_step=step)
    assert not w.taken(first) and len(w.seen) <= w.limit + 1  # ids this old can't pass the id window
    assert w.taken(MicroBatchId(79, 0))


# ---- averaging round acceptance ------------------------------------------------------------------------
AUTHORITY, NODE = RSAPrivateKey(), RSAPrivateKey()


class Peer:
    """What hivemind's group keys offer: to_base58()."""

    count = 0

    def __init__(self) -> None:
        Peer.count += 1
        self.name = f"peer{Peer.count}"

    def to_base58(self) -> str:
        return self.name


def _member(stage: int, final: bool = False) -> tuple[Peer, dict]:
    peer = Peer()
    cert = issue_cert(AUTHORITY, "run", peer.name, stage, public_bytes(NODE))
    return peer, {"cert": cert.model_dump(mode="json"), "final": final}


def test_judge_round() -> None:
    verifier = Verifier("run", public_bytes(AUTHORITY))
    a, b = _member(1), _member(1)
    assert judge_round(None, verifier, 1) == "failed"
    assert judge_round(dict([a]), verifier, 1) == "failed"  # no partner came
    assert judge_round(dict([a, b]), verifier, 1) == "applied"
    assert judge_round(dict([a, _member(2)]), verifier, 1) == "refused"  # a member of another stage
    outsider = (Peer(), {"final": True})
    assert judge_round(dict([a, outsider]), verifier, 1) == "refused"  # no certificate at all
    assert all_final(dict([_member(1, True), _member(1, True)]))
    assert not all_final(dict([_member(1, True), a]))


# ---- the schedules --------------------------------------------------------------------------------------
def test_schedules_answer_what_used_to_be_branches() -> None:
    assert schedule_named("sync") is SYNC and schedule_named("async") is ASYNC
    assert SYNC.commits and not SYNC.steps_after_backward and not SYNC.stash_weights
    assert ASYNC.steps_after_backward and ASYNC.stash_weights and ASYNC.averages and not ASYNC.commits
    assert SYNC.ref_step(4, frontier=9) == 4 and ASYNC.ref_step(4, frontier=9) == 9
    assert SYNC.takes(4, 4) and not SYNC.takes(5, 4) and ASYNC.takes(5, 4)
    assert SYNC.window(max_inflight=8, n_micro=4) == 4 and ASYNC.window(8, 4) == 2 + 256
