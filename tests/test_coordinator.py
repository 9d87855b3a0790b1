"""A real `coordinator serve` process: stage assignment over P2P, clean exit, restart on the same address."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import hivemind
import pytest

from pmnode.control import JOIN_RPC, ControlError, JoinReply, JoinRequest, call_json
from pmnode.dht import p2p_options

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def start(state: Path) -> tuple[subprocess.Popen, str]:
    info = state / "coordinator.json"
    info.unlink(missing_ok=True)  # a restart must not be mistaken for up by the last run's file
    p = subprocess.Popen(
        [
            str(BIN / "coordinator"),
            "serve",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--state-dir",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not info.exists():
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return p, json.loads(info.read_text())["maddrs"][0]


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    rc = p.wait(30)
    assert rc == 0, p.stderr.read() if p.stderr else ""


def test_assignment_and_restart(tmp_path: Path) -> None:
    proc, maddr = start(tmp_path)
    try:
        dht = hivemind.DHT(initial_peers=[maddr], start=True, **p2p_options("127.0.0.1"))
        try:

            async def scenario() -> None:
                p2p = await dht.replicate_p2p()
                peer = maddr.rsplit("/p2p/", 1)[1]

                async def ask(stage: int | None) -> int:
                    reply = await call_json(
                        p2p, peer, JOIN_RPC, JoinRequest(peer_id="t", stage=stage), JoinReply
                    )
                    assert reply.config["name"] == "tiny" and reply.fingerprint
                    return reply.stage

                # Calls from one peer replace its pending entry: an open choice stays at stage 0.
                assert await ask(None) == 0
                assert await ask(3) == 3
                with pytest.raises(ControlError, match=r"stage 9 is out of range"):
                    await ask(9)

            asyncio.run(scenario())
        finally:
            dht.shutdown()
    finally:
        stop(proc)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["run"] == "tiny" and state["maddrs"] == [maddr]
    proc, again = start(tmp_path)  # a restart keeps its identity and port: nodes' bootstrap address holds
    try:
        assert again == maddr
    finally:
        stop(proc)
