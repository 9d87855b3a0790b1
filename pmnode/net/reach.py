"""Reachability at join: the coordinator dials a joining node back on the addresses it announces.

Before starting its DHT, a node that listens on a non-loopback interface starts a bare libp2p peer on
the very port its DHT will use and asks the coordinator (REACH_RPC) to open a TCP connection to each
announced address, with a bounded wait. Reachable: it serves directly. Not: the head, which only calls
downstream and answers nothing, goes on outbound only (no relay slot); any other stage serves through a
relay slot (net.relay) on the coordinator or on a member that opted in with `--relay`. No relay
either: one line says what to do.

hivemind 1.1.12's p2pd has no DCUtR (hole punching) protocol built in, so there is no hole-punching
step between the two: an unreachable node goes straight to a relay.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Literal

from hivemind.p2p import P2P
from pydantic import BaseModel, ConfigDict, Field

from pmnode.errors import PmnodeError
from pmnode.net.control import ControlError, call_json, coordinator_peer
from pmnode.net.tunnel import Tunnel

REACH_RPC = "pmnode.coord.reach"  # fixed name, like JOIN_RPC: asked before the node knows the run
DIAL_TIMEOUT = 3.0  # seconds the coordinator waits for each dial-back
MAX_ADDRS = 8

Reach = Literal["direct", "relayed", "outbound"]


class ReachRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field("", max_length=256, repr=False, description="The run's join token.")
    maddrs: list[str] = Field(max_length=MAX_ADDRS, description="Where this node says it can be dialed.")


class ReachReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reachable: list[str] = Field(description="The announced addresses the coordinator could dial.")
    relays: list[str] = Field(description="Relays that take reservations: the coordinator, --relay members.")


class Reachability(BaseModel):
    """How this node is reached, as it announces it (StageRecord.reach / .addrs)."""

    model_config = ConfigDict(extra="forbid")

    mode: Reach = "direct"
    relays: list[str] = []
    addrs: list[str] = []


def is_local(host: str) -> bool:
    return host.startswith("127.") or host == "localhost"


def tcp_target(maddr: str) -> tuple[str, int] | None:
    """(host, port) of a plain /ip4|ip6/H/tcp/P[/p2p/ID] address; None for any other kind."""
    parts = maddr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and "p2p-circuit" not in parts:
        try:
            return parts[1], int(parts[3])
        except ValueError:
            return None
    return None


async def dial_back(maddrs: list[str], timeout: float = DIAL_TIMEOUT) -> list[str]:
    """The addresses that accept a TCP connection within `timeout` (all tried at once)."""

    async def one(maddr: str) -> bool:
        target = tcp_target(maddr)
        if target is None:
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*target), timeout)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    ok = await asyncio.gather(*(one(m) for m in maddrs[:MAX_ADDRS]))
    return [m for m, good in zip(maddrs, ok, strict=False) if good]


def free_port(host: str) -> int:
    """A port free on `host` now, so the probe and the DHT after it listen on the same one."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _probe(coordinator: str, host: str, port: int, announce: list[str], token: str) -> ReachReply:
    p2p = await P2P.create(
        initial_peers=[coordinator],
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        announce_maddrs=announce or None,
        nat_port_map=False,
        auto_nat=False,
    )
    try:
        if announce:
            mine = list(announce)
        else:
            found = [str(m) for m in await p2p.get_visible_maddrs()]
            mine = [m for m in found if (t := tcp_target(m)) and not is_local(t[0])][:MAX_ADDRS]
        req = ReachRequest(token=token, maddrs=mine)
        return await call_json(
            Tunnel(p2p), coordinator_peer(coordinator), REACH_RPC, req, ReachReply, timeout=20
        )
    finally:
        await p2p.shutdown()


def probe(coordinator: str, host: str, port: int, announce: list[str], token: str) -> ReachReply:
    """Ask the coordinator to dial this machine back on `port` (run outside any event loop)."""
    try:
        return asyncio.run(asyncio.wait_for(_probe(coordinator, host, port, announce, token), 40))
    except ControlError as e:
        raise PmnodeError(f"the coordinator did not check this node's reachability: {e}") from e
    except asyncio.TimeoutError:
        raise PmnodeError(f"the coordinator at {coordinator} did not answer the reachability check") from None
    except PmnodeError:
        raise
    except Exception as e:
        raise PmnodeError(f"could not reach the coordinator at {coordinator}: {e}") from e


def decide(reply: ReachReply, port: int, stage: int | None) -> Reachability:
    """Direct when dialed back; else outbound-only for the head (it only calls downstream, so it takes
    no relay slot); else relayed when a relay is offered."""
    if reply.reachable:
        return Reachability(mode="direct")
    if stage == 0:
        return Reachability(mode="outbound")
    if reply.relays:
        return Reachability(mode="relayed", relays=reply.relays)
    raise PmnodeError(
        f"this node cannot be reached from outside (the coordinator's dial-back to port {port} failed) and "
        f"the run has no relay: forward TCP port {port} to this machine and pass --port {port} --announce "
        "/ip4/PUBLIC_IP/tcp/PORT, or ask the operator for a relay (`coordinator serve` without --no-relay, "
        "or a member with `pmnode join --relay`)"
    )
