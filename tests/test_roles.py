"""Roles only the right member can play (swarm.roles), without a network: only a current head passes
the head's admission, only the head's seal ends the run, and a state copy that is not of this stage
as laid out here, or of another step, is refused before anything is loaded."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.config import load_config
from pmnode.core.replica_state import load_state_tensors, state_tensors
from pmnode.core.snapshot_meta import StateMeta, SumsMeta
from pmnode.core.worker import StageWorker
from pmnode.errors import PmnodeError
from pmnode.net.auth import AuthError, Guard, Verifier, issue_cert, public_bytes
from pmnode.net.callproof import Identity
from pmnode.net.control import Done
from pmnode.swarm.roles import DONE_FRESH, check_done, seal_done

AUTHORITY = RSAPrivateKey()
RUN = "roles-run"


def _guard(stage: int = 1) -> Guard:
    verifier = Verifier(RUN, public_bytes(AUTHORITY))
    return Guard(verifier, stage, rate=1e6, burst=10**6, ban_after=3, ban_seconds=60)


def _member(peer: str, stage: int, slot: int = 0, age: float = 0.0) -> tuple[Identity, object]:
    key = RSAPrivateKey()
    cert = issue_cert(AUTHORITY, RUN, peer, stage, public_bytes(key), slot=slot, now=time.time() - age)
    return Identity(key, lambda: cert), cert


def test_only_a_current_head_passes_the_heads_admission() -> None:
    guard = _guard()
    _, old = _member("old-head", 0, age=60)  # the slot's head before the coordinator gave it to "head"
    _, new = _member("head", 0)
    _, other = _member("stage1", 1)
    _, slot1 = _member("head-1", 0, slot=1)
    for peer, cert in (("old-head", old), ("head", new), ("stage1", other), ("head-1", slot1)):
        guard.hello(cert, peer)  # type: ignore[arg-type]
    assert guard.admit_head("head") is None
    assert guard.admit_head("head-1") is None  # another slot's head: every certified slot heads
    assert guard.admit_head("old-head") == "not the head"
    assert guard.admit_head("stage1") == "not the head"
    assert guard.admit_head("stranger") == "unauthorized"  # no certificate shown: no strike
    assert guard.rejected["not the head"] == 2 and len(guard.strikes["stage1"]) == 1
    for _ in range(2):
        guard.admit_head("stage1")
    assert guard.admit_head("stage1") == "banned" and guard.bans == 1
    assert guard.admit_head("head") is None  # the head is untouched by it all


def test_only_the_heads_seal_ends_the_run() -> None:
    guard, now = _guard(2), time.time()
    head, head_cert = _member("head", 0)
    guard.saw_head(head_cert)  # type: ignore[arg-type]
    sealed = seal_done(head, RUN, "head", 30, now=now)
    assert check_done(sealed, guard.verifier, guard, "stage1", now=now) is sealed
    member, _ = _member("stage1", 1)
    stale, _ = _member("old-head", 0, age=60)
    forged = sealed.model_copy(deep=True)
    forged.seal.step = 3  # type: ignore[union-attr]
    for bad, why in (
        (Done(), "without the head's seal"),
        (seal_done(member, RUN, "stage1", 30, now=now), "certificate for stage 1"),
        (seal_done(head, "other-run", "head", 30, now=now), "run 'other-run'"),
        (seal_done(stale, RUN, "old-head", 30, now=now), "given to another"),
        (forged, "does not verify"),
        (seal_done(head, RUN, "head", 30, now=now - DONE_FRESH - 1), "from now"),
    ):
        with pytest.raises(AuthError, match=why):
            check_done(bad, guard.verifier, guard, "stage1", now=now)
    assert sum(guard.rejected.values()) == 6  # each counted, each a strike against the sender
    assert guard.bans == 1 and "stage1" in guard.banned  # banned at its third (ban_after 3)


def _copy(worker: StageWorker) -> tuple[dict[str, torch.Tensor], StateMeta]:
    tensors, meta = state_tensors(worker)
    return {k: v.clone() for k, v in tensors.items()}, meta


def test_a_state_copy_not_like_ours_or_of_another_step_is_not_loaded() -> None:
    cfg = load_config("tiny").with_overrides(n_stages=2)
    src, dst = StageWorker(cfg, 1, cfg.codec_spec), StageWorker(cfg, 1, cfg.codec_spec)
    before = {k: v.clone() for k, v in dst.stage.state_dict().items()}
    name = next(iter(_copy(src)[0]))
    cases = []
    t, m = _copy(src)
    t[name] = t[name].reshape(-1)[:1].clone()  # a one-element tensor
    cases.append((t, m, None, "is torch"))
    t, m = _copy(src)
    t[name] = t[name].double()
    cases.append((t, m, None, "is torch.float64"))
    t, m = _copy(src)
    del t[name]
    cases.append((t, m, None, "not this stage's"))
    t, m = _copy(src)
    t["optim/9999/exp_avg"] = torch.zeros(3)
    cases.append((t, m, None, "of no weight"))
    t, m = _copy(src)
    t["optim/0/exp_avg"] = torch.zeros(1)
    cases.append((t, m, None, "optimizer state"))
    t, m = _copy(src)
    cases.append((t, m, 7, "of step 0, not 7"))
    t, m = _copy(src)
    cases.append((t, SumsMeta(step=0, samples=8), None, "without its optimizer layout"))  # a sums snapshot
    with pytest.raises(ValueError):  # a negative step never gets past the manifest's decode
        m.model_validate({**m.model_dump(), "step": -1})
    for tensors, meta, step, why in cases:
        with pytest.raises(PmnodeError, match=why):
            load_state_tensors(dst, tensors, meta, step)
        assert all(torch.equal(v, before[k]) for k, v in dst.stage.state_dict().items())
    load_state_tensors(dst, *_copy(src), 0)  # the copy itself, at its step, loads
    assert all(torch.equal(v, src.stage.state_dict()[k]) for k, v in dst.stage.state_dict().items())
