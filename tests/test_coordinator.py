"""A real `coordinator serve` process: stage assignment over P2P, clean exit, restart on the same address."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import hivemind
import pytest
from hivemind.utils.crypto import RSAPrivateKey
from launch import start_coordinator as start
from launch import stop_coordinator as stop

from pmnode.net.auth import Verifier, public_bytes
from pmnode.net.control import JOIN_RPC, ControlError, JoinReply, JoinRequest, call_json
from pmnode.net.dht import p2p_options
from pmnode.net.tokens import load_or_create_key
from pmnode.net.tunnel import Tunnel


def test_assignment_and_restart(tmp_path: Path) -> None:
    proc, maddr = start(tmp_path)
    token_file = tmp_path / "join_token"
    assert (
        stat.S_IMODE(token_file.stat().st_mode) == 0o600
        and stat.S_IMODE((tmp_path / "authority.key").stat().st_mode) == 0o600
    )
    token, key, authority = token_file.read_text(), RSAPrivateKey(), []
    try:
        dht = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
        try:

            async def scenario() -> None:
                p2p = Tunnel(await dht.replicate_p2p())
                peer = maddr.rsplit("/p2p/", 1)[1]

                me = dht.peer_id.to_base58()

                async def ask(stage: int | None, token: str = token) -> JoinReply:
                    req = JoinRequest(peer_id="t", stage=stage, token=token, public_key=public_bytes(key))
                    reply = await call_json(p2p, peer, JOIN_RPC, req, JoinReply)
                    assert reply.config["name"] == "tiny" and reply.fingerprint
                    return reply

                # Calls from one peer replace its pending entry: an open choice stays at stage 0.
                first = await ask(None)
                assert first.stage == 0
                # The certificate binds the peer id libp2p authenticated, not the one the request names.
                Verifier("tiny", first.authority).check_cert(first.cert, peer_id=me, stage=0)
                assert first.cert.public_key == public_bytes(key)
                authority.append(first.authority)
                assert (await ask(3)).stage == 3
                with pytest.raises(ControlError, match=r"stage 9 is out of range"):
                    await ask(9)
                with pytest.raises(ControlError, match=r"wrong join token"):
                    await ask(1, token="guess")
                with pytest.raises(ControlError, match=r"wrong join token"):
                    await ask(1, token="")

            asyncio.run(scenario())
        finally:
            dht.shutdown()
    finally:
        first_out = stop(proc)
    assert token in first_out  # shown to the operator on the first start
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["run"] == "tiny" and state["maddrs"] == [maddr]
    proc, again = start(tmp_path)  # a restart keeps its identity and port: nodes' bootstrap address holds
    try:
        assert again == maddr
        assert token_file.read_text() == token  # the same secret and signing key after a restart
        assert authority[0] == public_bytes(load_or_create_key(tmp_path / "authority.key"))
    finally:
        out = stop(proc)
    assert token not in out  # shown once, on the first start only
