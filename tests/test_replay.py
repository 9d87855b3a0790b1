"""Replays and the status door: a captured signed record cannot be stored past its announcement nor
bring back an older state of its signer; the coordinator's libp2p status asks for its page's token."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer
from rich.console import Console

from pmnode.config import load_config
from pmnode.net.auth import AuthError, issue_cert, public_bytes
from pmnode.net.records import RECORD_SLACK, SwarmValidator, sign_record
from pmnode.net.relay import RelayLimits
from pmnode.net.routing import RECORD_TTL, StageRecord, stage_key
from pmnode.net.status import StatusRequest

RUN, AUTHORITY, NODE = "replay-run", RSAPrivateKey(), RSAPrivateKey()


def _stored(at: float, expiration: float, peer: str = "peerA", step: int = 3) -> DHTRecord:
    cert = issue_cert(AUTHORITY, RUN, peer, 1, public_bytes(NODE))
    value = sign_record(StageRecord(peer_id=peer, stage=1, step=step, time=at), cert, NODE)
    key = DHTID.generate(source=stage_key(RUN, 1)).to_bytes()
    return DHTRecord(key, MSGPackSerializer.dumps(peer), MSGPackSerializer.dumps(value), expiration)


def test_a_captured_record_lives_no_longer_than_its_announcement() -> None:
    val, now = SwarmValidator(RUN, 3, public_bytes(AUTHORITY)), time.time()
    assert val.validate(_stored(now, now + RECORD_TTL))
    assert not val.validate(_stored(now, now + RECORD_TTL + RECORD_SLACK + 1))  # 66 s passed before
    assert not val.validate(_stored(now, now + RECORD_TTL + 60))


def test_an_older_record_of_a_signer_is_refused_once_a_newer_one_was_seen() -> None:
    val, now = SwarmValidator(RUN, 3, public_bytes(AUTHORITY)), time.time()
    old = _stored(now - 2, now - 2 + RECORD_TTL, step=3)
    assert val.validate(old)
    new = _stored(now, now + RECORD_TTL, step=4)
    assert val.validate(new) and val.validate(new)  # the same record again is no replay of an old one
    assert not val.validate(old)  # the step-3 state cannot come back
    assert val.validate(_stored(now - 2, now - 2 + RECORD_TTL, peer="peerB"))  # per signer


def test_the_status_over_libp2p_needs_the_pages_token(tmp_path: Path) -> None:
    from coordinator.server import Coordinator

    coord = Coordinator(
        load_config("tiny"), host="127.0.0.1", port=0, state_dir=tmp_path, console=Console(quiet=True),
        token="join", relay=RelayLimits(serve=False), http_token="page-token",
    )  # fmt: skip
    for given in ("", "join", "page-tokenx"):
        with pytest.raises(AuthError, match="HTTP token"):
            asyncio.run(coord._on_status(StatusRequest(token=given), "outsider"))
    assert coord.metrics.refused._value.get() == 3
    assert asyncio.run(coord._on_status(StatusRequest(token="page-token"), "operator")).run == "tiny"
    open_coord = Coordinator(
        load_config("tiny"), host="127.0.0.1", port=0, state_dir=tmp_path / "b", console=Console(quiet=True),
        relay=RelayLimits(serve=False),
    )  # fmt: skip
    assert asyncio.run(open_coord._on_status(StatusRequest(), "anyone")).run == "tiny"  # no page token
