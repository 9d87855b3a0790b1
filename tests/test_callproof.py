"""net.callproof without a network, on a fake clock: a forwarded call's proof is fresh, unreplayed,
in order and sealed, or it is refused; and relays are only those the operator named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hivemind.utils.crypto import RSAPrivateKey
from rich.console import Console

from pmnode.config import load_config
from pmnode.net.auth import AuthError, Verifier, issue_cert, public_bytes
from pmnode.net.callproof import FRESH, Checker, Identity, ReplyCheck, Signer
from pmnode.net.reach import ReachRequest
from pmnode.net.relay import RelayLimits
from pmnode.net.routing import StageRecord

AUTHORITY, KEY = RSAPrivateKey(), RSAPrivateKey()
T0 = 1.0e9
CERT = issue_cert(AUTHORITY, "r", "caller", 1, public_bytes(KEY), now=T0)
ME = Identity(KEY, lambda: CERT)


def _checker(clock: list[float]) -> Checker:
    return Checker(Verifier("r", public_bytes(AUTHORITY)), "target", clock=lambda: clock[0])


def _signer(nonce: str = "n" * 16, at: float = T0) -> Signer:
    return Signer(ME, "caller", "target", "run.forward", nonce, now=at)


def test_fresh_calls_pass_once_stale_and_replayed_ones_do_not() -> None:
    clock = [T0]
    check = _checker(clock)
    assert check.first([_signer().sign(b"x", True)], b"x", "caller", "run.forward").ended
    with pytest.raises(AuthError, match="replayed"):
        check.first([_signer().sign(b"x", True)], b"x", "caller", "run.forward")
    with pytest.raises(AuthError, match="from now"):  # made over a minute before the target's now
        check.first([_signer("m" * 16, T0 - FRESH - 1).sign(b"x", True)], b"x", "caller", "run.forward")
    clock[0] = T0 + 3 * FRESH  # the first nonce is forgotten, but its time no longer passes either
    with pytest.raises(AuthError, match="from now"):
        check.first([_signer().sign(b"x", True)], b"x", "caller", "run.forward")
    check.first([_signer("p" * 16, clock[0]).sign(b"x", True)], b"x", "caller", "run.forward")
    assert list(check.nonces) == ["p" * 16]  # the table keeps only what could still be replayed


def test_a_streamed_call_must_come_in_order_and_sealed() -> None:
    check, s = _checker([T0]), _signer()
    session = check.first([s.sign(b"", False)], b"", "caller", "run.forward")
    one, two = s.sign(b"1", False), s.sign(b"2", False)
    with pytest.raises(AuthError, match="order"):
        session.next([two], b"2")  # the relay skipped a message
    session.next([one], b"1")
    with pytest.raises(AuthError, match="changed"):
        session.next([two], b"3")
    session.next([two], b"2")
    session.next([s.sign(b"", True)], b"")
    assert session.ended
    with pytest.raises(AuthError, match="order"):  # nothing belongs to the call after its seal
        session.next([s.sign(b"4", False)], b"4")


def test_a_proof_for_another_target_or_handler_is_refused() -> None:
    check = _checker([T0])
    other = Signer(ME, "caller", "elsewhere", "run.forward", "o" * 16, now=T0)
    with pytest.raises(AuthError, match="another call"):
        check.first([other.sign(b"x", True)], b"x", "caller", "run.forward")
    with pytest.raises(AuthError, match="another call"):
        check.first([_signer().sign(b"x", True)], b"x", "caller", "run.done")
    with pytest.raises(AuthError, match="without"):
        check.first([], b"x", "caller", "run.forward")


def test_only_the_members_the_operator_named_relay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import server

    async def reachable(maddrs: list[str]) -> list[str]:
        return []

    monkeypatch.setattr(server, "dial_back", reachable)
    cfg = load_config("tiny")
    coord = server.Coordinator(
        cfg, host="127.0.0.1", port=0, state_dir=tmp_path, console=Console(quiet=True), token="t",
        relay=RelayLimits(serve=False), relay_peers=["named"],
    )  # fmt: skip
    coord.members = {
        s: [StageRecord(peer_id=p, stage=s, relay=True, addrs=[f"/ip4/10.0.0.{s}/tcp/1/p2p/{p}"])]
        for s, p in ((1, "named"), (2, "self-declared"))
    }
    reply = asyncio.run(coord._on_reach(ReachRequest(token="t", maddrs=[]), "joiner"))
    assert reply.relays == ["/ip4/10.0.0.1/tcp/1/p2p/named"]  # a member's own `relay=True` is not enough


def test_an_answer_cannot_pass_for_a_call_nor_answer_another_call() -> None:
    check = _checker([T0])
    session = check.first([_signer().sign(b"x", True)], b"x", "caller", "run.forward")
    target_key = RSAPrivateKey()
    target_cert = issue_cert(AUTHORITY, "r", "target", 2, public_bytes(target_key))  # valid now
    replier = session.replier(Identity(target_key, lambda: target_cert))
    answer = replier.sign(b"y", True)
    # the target's answer, relayed back to it as if the caller had called it again
    back = Checker(Verifier("r", public_bytes(AUTHORITY)), "caller", clock=lambda: T0)
    with pytest.raises(AuthError, match="another call"):
        back.first([answer], b"y", "target", "run.forward")
    verifier = Verifier("r", public_bytes(AUTHORITY))
    assert ReplyCheck(verifier, "caller", "target", "run.forward", "n" * 16).answered([answer], b"y")
    with pytest.raises(AuthError, match="another call"):  # the answer to an earlier call of the caller's
        ReplyCheck(verifier, "caller", "target", "run.forward", "m" * 16).answered([answer], b"y")
