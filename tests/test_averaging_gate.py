"""The averaging gate's policy without a network: who may join, lead, send parts; what is counted.
(The mechanism, on real processes: test_averaging_auth.py.)"""

from __future__ import annotations

import pytest
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from pmnode.net.auth import Guard, Verifier, issue_cert, public_bytes
from pmnode.swarm.guarded_averager import AveragingGate, Refusals, gathered_cert

AUTHORITY, NODE = RSAPrivateKey(), RSAPrivateKey()
A = "12D3KooWMFCdEmDPYXZfJt1Kdkev5tawFwPzKZHvqQkpNwQs8Vb3"
B = "12D3KooWRLLTHpeWigYTQEHBEwnBx4apLYELLgS2qzV3vnok8tBH"
OUTSIDER = "12D3KooWJQNTbg3BKWHns3N6gD8DyYVa8EucTL7s6wiFyW7JVzs2"


def _blob(peer: str, stage: int = 1, run: str = "r") -> bytes:
    """What hivemind's step() sends as `gather`: [bandwidth, mode, user data], the user data ours."""
    cert = issue_cert(AUTHORITY, run, peer, stage, public_bytes(NODE))
    user = MSGPackSerializer.dumps({"cert": cert.model_dump(mode="json"), "final": False})
    return MSGPackSerializer.dumps([None, 0, user])


def _gate() -> AveragingGate:
    guard = Guard(Verifier("r", public_bytes(AUTHORITY)), 1, rate=10, burst=10, ban_after=3, ban_seconds=60)
    return AveragingGate(guard, Refusals())


def test_gathered_certificate_round_trip_and_garbage() -> None:
    assert gathered_cert(_blob(A)).peer_id == A
    for junk in (b"", b"\x00", MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps({"x": 1})])):
        assert _gate().hello(OUTSIDER, junk) == "bad certificate"


def test_join_needs_a_certificate_of_this_stage_for_the_caller() -> None:
    gate = _gate()
    assert gate.hello(A, _blob(A)) is None  # a replica of stage 1
    assert gate.hello(OUTSIDER, _blob(A)) == "unauthorized"  # a member's certificate, stolen
    assert gate.hello(B, _blob(B, stage=2)) == "unauthorized"  # another stage's member
    assert gate.hello(B, _blob(B, run="other")) == "unauthorized"  # another run's
    assert gate.admit(A, "part") and not gate.admit(OUTSIDER, "part") and not gate.admit(B, "state")
    assert gate.refusals.snapshot() == {"join": 0, "part": 1, "state": 1, "leader": 0, "group": 0}


def test_a_refused_caller_is_banned_after_repeated_strikes() -> None:
    gate = _gate()
    for _ in range(3):
        assert gate.hello(OUTSIDER, _blob(A)) == "unauthorized"
    assert gate.hello(OUTSIDER, _blob(OUTSIDER)) == "banned"  # even with a valid certificate, for a while


def test_follow_only_listed_replicas_and_certified_groups() -> None:
    gate = _gate()
    gate.leaders = {A}
    assert gate.may_lead(A) and not gate.may_lead(OUTSIDER)
    me, a, x = (PeerID.from_base58(p).to_bytes() for p in (B, A, OUTSIDER))
    gate.check_group(PeerID(me), [a, me], [_blob(A), b"not even checked: it is us"])
    with pytest.raises(MatchmakingException):
        gate.check_group(PeerID(me), [a, x, me], [_blob(A), _blob(A), b""])
    assert gate.refusals.snapshot() == {"join": 0, "part": 0, "state": 0, "leader": 1, "group": 1}
