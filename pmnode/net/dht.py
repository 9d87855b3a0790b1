"""The DHT side of a swarm: starting a peer, announcing stage records, reading them back."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from pmnode.errors import PmnodeError
from pmnode.net.auth import Cert, Verifier
from pmnode.net.records import open_record, sign_record
from pmnode.net.routing import RECORD_TTL, StageRecord, live, stage_key

T = TypeVar("T")

# A failed bootstrap is tried this many times in all, pausing 2 s, then 4 s.
BOOTSTRAP_ATTEMPTS = 3
BOOTSTRAP_PAUSE = 2.0


def p2p_options(host: str) -> dict[str, bool]:
    """On loopback, no UPnP port mapping or AutoNAT probes: they would talk to the LAN for nothing."""
    local = host.startswith("127.") or host == "localhost"
    return {"nat_port_map": not local, "auto_nat": not local}


def start_dht(
    initial_peers: list[str],
    host: str,
    port: int,
    *,
    announce: list[str] | None = None,
    identity_path: Path | None = None,
    what: str = "this node",
    record_validators: list[RecordValidatorBase] | None = None,
    attempts: int = BOOTSTRAP_ATTEMPTS,
    **p2p: object,
) -> hivemind.DHT:
    """Start a DHT peer (and its p2pd). Call it before any event loop installs signal handlers.

    A bootstrap that fails is tried again (`attempts` in all, with a pause that doubles): a coordinator
    that has just started, or one on a loaded VPS, may miss p2pd's first dial, and a node started with
    it (docker compose starts both at once) should wait for it rather than exit."""
    if port:
        _check_port(host, port, what)
    for attempt in range(1, attempts + 1):
        try:
            return hivemind.DHT(
                initial_peers=initial_peers or None,
                start=True,
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                announce_maddrs=announce or None,
                identity_path=str(identity_path) if identity_path else None,
                record_validators=record_validators or (),
                **{**p2p_options(host), **p2p},
            )
        except Exception as e:
            why = re.sub(r"^.*\d\d:\d\d:\d\d ", "", str(e).strip().splitlines()[-1])  # p2pd's timestamp
            if initial_peers and "bootstrap" in why and attempt < attempts:
                time.sleep(BOOTSTRAP_PAUSE * 2 ** (attempt - 1))
                continue
            if initial_peers:
                raise PmnodeError(
                    f"could not reach the coordinator at {initial_peers[0]} ({why}); check the address and "
                    "that `coordinator serve` is running and reachable from here"
                ) from e
            raise PmnodeError(f"could not start {what} on {host}:{port}: {why}") from e
    raise AssertionError("unreachable")


def _check_port(host: str, port: int, what: str) -> None:
    """A clear line for a taken port, before p2pd fails on it with a less clear one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as p2pd binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            raise PmnodeError(
                f"cannot start {what} on {host}:{port}: {e.strerror or e}; pick another --port, or 0 for any"
            ) from e


async def stage_records(dht: hivemind.DHT, run: str, stage: int, verifier: Verifier) -> list[StageRecord]:
    """The live records announced under a stage. A record that is malformed, unsigned, signed by a
    non-member or for another stage is skipped, never trusted (the DHT's validator refuses them
    too; this is the reader's own check)."""
    found = await dht.get(stage_key(run, stage), latest=True, return_future=True)
    recs = []
    if found is not None and isinstance(found.value, dict):
        for subkey, sub in found.value.items():
            try:
                recs.append(open_record(sub.value, verifier, stage, subkey))
            except Exception:
                continue
    return live(recs)


async def announce(dht: hivemind.DHT, run: str, rec: StageRecord, cert: Cert, key: RSAPrivateKey) -> None:
    await dht.store(
        stage_key(run, rec.stage),
        subkey=rec.peer_id,
        value=sign_record(rec, cert, key),
        expiration_time=min(get_dht_time(), rec.time) + RECORD_TTL,
        return_future=True,
    )


async def keep_in_touch(dht: hivemind.DHT, maddr: str, timeout: float = 5.0) -> bool:
    """Ping the bootstrap peer (the coordinator) from this DHT node.

    Both sides then keep each other in their routing tables. A DHT peer drops a peer that stops
    answering, so without this a restarted coordinator would start with an empty table and never
    hear from the swarm it bootstrapped; with it, it learns every node within a few heartbeats.
    """
    try:
        return bool(
            await asyncio.wait_for(dht.run_coroutine(partial(_ping, maddr), return_future=True), timeout)
        )
    except Exception:
        return False


async def _ping(maddr: str, _dht: hivemind.DHT, node: DHTNode) -> bool:
    addr, peer = maddr.rsplit("/p2p/", 1)
    peer_id = PeerID.from_base58(peer)
    try:
        # The daemon may have forgotten the address of a peer that went away; give it again.
        await node.p2p._client.connect(peer_id, [Multiaddr(addr)])
        return await node.protocol.call_ping(peer_id) is not None
    except Exception:  # the coordinator is down: quietly, hivemind would log a traceback each time
        return False


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run main(stop) in a fresh event loop; SIGINT and SIGTERM set `stop` for a clean shutdown."""

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(runner())
