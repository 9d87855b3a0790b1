"""Signed state digests (issue 25, item 2), without a network: a replica's state copy is taken only when
its sender vouched for it, with the key of the certificate the receiver checked for it, as of this run,
stage, step and sender; a copy that fails is refused with its reason, counted, the sender struck, and
the copy goes on with the next replica. Peers this node's guard banned are never copied from.

The senders are fakes: net.bulk's own BulkServer over a snapshot they sign (or forge); the receiver is
swarm.replicas.Replicas.fetch_state / catch_up with fake transport (Downstream.ask_replica calls the
sender's BulkServer in-process)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.core.codecs import Packet
from pmnode.core.snapshot_meta import StateMeta
from pmnode.errors import PmnodeError
from pmnode.net.auth import Cert, Guard, Verifier, issue_cert, public_bytes
from pmnode.net.bulk import BulkServer, Received, Snapshot, TransferError, pack
from pmnode.net.callproof import Identity
from pmnode.net.meta import BulkOpen, BulkRequest
from pmnode.net.state_digest import (
    BAD_DIGEST,
    BAD_SIGNATURE,
    OTHER_SOURCE,
    OTHER_STEP,
    SIGNED,
    UNSIGNED,
    StateCheck,
    StateDigest,
    StateRefused,
    vouch,
)
from pmnode.swarm import replicas as replicas_mod

AUTHORITY = RSAPrivateKey()
VERIFIER = Verifier("digest-run", public_bytes(AUTHORITY))
RUN, STAGE, STEP = "digest-run", 1, 4
CHUNK = 4096  # small chunks: the state below spans several


def _member(peer: str, stage: int = STAGE) -> tuple[Identity, Cert]:
    key = RSAPrivateKey()
    cert = issue_cert(AUTHORITY, RUN, peer, stage, public_bytes(key))
    return Identity(key, lambda: cert), cert


MEMBERS = {p: _member(p) for p in ("peer-aaaaaaaa", "peer-bbbbbbbb", "peer-cccccccc")}
A, B, C = sorted(MEMBERS)


def _state(step: int = STEP) -> tuple[dict[str, torch.Tensor], StateMeta]:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "model/w": torch.randn(64, 64, generator=g),
        "optim/0/exp_avg": torch.randn(64, 64, generator=g),
    }
    return tensors, StateMeta(step=step, param_groups=[])


def _signed(
    snap: Snapshot, signer: str, *, source: str | None = None, step: int | None = None
) -> StateDigest:
    me = MEMBERS[signer][0]
    signed = vouch(me, run=RUN, stage=STAGE, source=source or signer, manifest=snap.manifest)
    if step is not None:  # signed for another step than the copy's own
        signed = signed.model_copy(update={"step": step})
        signed.sig = me.key.sign(signed.body()).decode()
    return signed


class Sender:
    """A replica's `state` door: an honest one signs the snapshot it serves; `forge` makes it a liar."""

    def __init__(self, peer: str, forge: Callable[[Snapshot], None] | None = None, step: int = STEP):
        self.peer, self.forge, self.step = peer, forge, step
        self.bulk = BulkServer(self._now)
        self.asked = 0

    @staticmethod
    async def _now(make: Callable[[], Snapshot]) -> Snapshot:
        return make()

    def snapshot(self) -> Snapshot:
        snap = pack(*_state(self.step), chunk=CHUNK)
        snap.extra[SIGNED] = _signed(snap, self.peer).model_dump_json().encode()
        if self.forge is not None:
            self.forge(snap)
        return snap

    async def answer(self, req: BulkRequest) -> Packet:
        self.asked += 1
        return await self.bulk.answer(req, self.snapshot)


def _tamper_a_byte(snap: Snapshot) -> None:
    """The sender changes one byte of what it serves after signing it, and fixes the chunk's checksum,
    so the transfer itself goes through: only the signed digest can tell."""
    snap.buffer[5000] ^= 0x01
    i = 5000 // CHUNK
    chunk = bytes(snap.buffer[i * CHUNK : (i + 1) * CHUNK])
    snap.manifest.chunks[i] = hashlib.sha256(chunk).hexdigest()


def _signed_by(signer: str, **kw: Any) -> Callable[[Snapshot], None]:
    def forge(snap: Snapshot) -> None:
        snap.extra[SIGNED] = _signed(snap, signer, **kw).model_dump_json().encode()

    return forge


def _unsigned(snap: Snapshot) -> None:
    del snap.extra[SIGNED]


def _replicas(senders: list[Sender], guard: Guard) -> tuple[replicas_mod.Replicas, list[str]]:
    """A receiving replica of stage 1 whose calls reach `senders` in-process; it has greeted them all."""
    said: list[str] = []
    by_peer = {s.peer: s for s in senders}

    async def ask_replica(rpc: object, peer: str, header: Any) -> tuple[Any, Packet]:
        return header, await by_peer[peer].answer(header.meta)

    async def records(stage: int) -> list[object]:
        return []

    async def load_state(got: Received, at_step: int | None = None, keep_step: bool = False) -> None:
        runner.loaded.append((got, at_step))

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    runner = SimpleNamespace(
        loaded=[], load_state=load_state, run=run, batch=8, samples_applied=0, worker=None
    )
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(name=RUN),
        stage=STAGE,
        peer_id="peer-receiver",
        verifier=VERIFIER,
        runner=runner,
        p2p=SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "peer-receiver")),
        header=lambda mb, meta: SimpleNamespace(meta=meta),
        say=said.append,
        console=SimpleNamespace(print=lambda *a, **k: said.append(str(a[0]))),
    )
    downstream = SimpleNamespace(ask_replica=ask_replica, greeted={p: c for p, (_, c) in MEMBERS.items()})
    view = SimpleNamespace(records=records)
    me = _member("peer-receiver")[0]
    reps = replicas_mod.Replicas(ctx, SimpleNamespace(), view, downstream, identity=me, guard=guard)  # type: ignore[arg-type]
    return reps, said


def _guard() -> Guard:
    return Guard(VERIFIER, STAGE, rate=1e6, burst=10**6, ban_after=3, ban_seconds=60)


@pytest.fixture(autouse=True)
def _small_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas_mod, "max_state_bytes", lambda worker: 2**20)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "forge, at_step, reason",
    [
        (_tamper_a_byte, None, BAD_DIGEST),
        (_signed_by(A), None, OTHER_SOURCE),  # another replica's signed digest, served as is
        (_signed_by(A, source=B), None, BAD_SIGNATURE),  # "mine", signed with another replica's key
        (None, STEP + 1, OTHER_STEP),  # an honest signature of step 4 when step 5 was asked for
        (_signed_by(B, step=STEP + 1), None, OTHER_STEP),  # signed for a step the copy is not of
        (_unsigned, None, UNSIGNED),
    ],
    ids=["tampered byte", "another's digest", "another's key", "step asked", "step signed", "unsigned"],
)
def test_a_copy_its_sender_did_not_vouch_for_is_refused_and_the_next_sender_serves(
    forge: Callable[[Snapshot], None] | None, at_step: int | None, reason: str
) -> None:
    step = STEP if at_step is None else at_step
    liar, honest = Sender(B, forge), Sender(C, step=step)
    guard = _guard()
    reps, said = _replicas([liar, honest], guard)
    got, peer = asyncio.run(reps.fetch_state([B, C], at_step=at_step))
    assert peer == C  # fell back to the next replica
    assert got.manifest.digest == honest.snapshot().manifest.digest
    assert liar.asked == 1  # refused on the open: not one chunk was asked of it
    assert dict(guard.rejected) == {reason: 1}  # counted with the node's refusals, by its reason
    assert len(guard.strikes[B]) == 1 and C not in guard.strikes  # the sender struck, not the next
    assert any(f"state copy from {B[-8:]} refused: {reason}" in s for s in said)


def test_the_bytes_received_are_hashed_again_and_compared_with_the_signed_digest() -> None:
    honest = Sender(C)
    snap = honest.snapshot()
    reply = asyncio.run(honest.answer(BulkOpen()))
    refused: list[tuple[str, str]] = []
    check = StateCheck(
        VERIFIER, RUN, STAGE, {C: MEMBERS[C][1]}.get, STEP, lambda p, r: refused.append((p, r))
    )
    man = snap.manifest.model_copy(update={"ticket": "t"})
    asyncio.run(check.opened(C, reply, man))
    whole = Received(man, bytearray(snap.buffer))
    asyncio.run(check.received(C, whole))  # as signed: taken
    whole.buffer[100] ^= 0x80  # one byte changed after its chunk's checksum was checked
    with pytest.raises(StateRefused, match=BAD_DIGEST):
        asyncio.run(check.received(C, whole))
    assert refused == [(C, BAD_DIGEST)]


def test_a_sender_whose_certificate_this_node_did_not_check_is_left_unstruck() -> None:
    """Our certificate was renewed meanwhile (Downstream forgets whom it greeted): not the sender's fault."""
    reply = asyncio.run(Sender(C).answer(BulkOpen()))
    refused: list[tuple[str, str]] = []
    check = StateCheck(VERIFIER, RUN, STAGE, {}.get, None, lambda p, r: refused.append((p, r)))
    man = Sender(C).snapshot().manifest
    with pytest.raises(TransferError, match="no checked certificate"):
        asyncio.run(check.opened(C, reply, man))
    assert refused == []


@pytest.mark.timeout(60)
def test_banned_peers_are_never_copied_from() -> None:
    """The head's Prepare(peers=[...]) names who to catch up from: those this node banned are skipped,
    and when every one is banned the replica does not catch up (nor take the stage from a checkpoint)."""
    guard = _guard()
    guard.banned[B] = time.monotonic() + 60
    guard.banned[A] = time.monotonic() - 1  # a ban that has run out: copied from again
    banned, expired, honest = Sender(B), Sender(A), Sender(C)
    reps, _ = _replicas([banned, expired, honest], guard)
    got, peer = asyncio.run(reps.fetch_state([B, C]))
    assert (peer, banned.asked) == (C, 0)
    assert asyncio.run(reps.fetch_state([A]))[1] == A
    adopted: list[int] = []

    async def adopt(step: int) -> None:
        adopted.append(step)

    reps.adopt = adopt  # type: ignore[method-assign]
    runner: Any = reps.ctx.runner
    asyncio.run(reps.catch_up(STEP, [B, C]))  # Prepare(step=4, peers=[B, C]): from C
    assert [(g.manifest.digest, s) for g, s in runner.loaded] == [(got.manifest.digest, STEP)]
    with pytest.raises(PmnodeError, match="every one banned"):
        asyncio.run(reps.catch_up(STEP, [B]))
    assert banned.asked == 0 and adopted == [] and len(runner.loaded) == 1
    assert not guard.rejected  # skipping a banned peer is no new refusal
