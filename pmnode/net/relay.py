"""Circuit relays (libp2p relay v2, in hivemind's p2pd): who serves them, their limits, reservations.

Every p2pd this process starts gets explicit relay flags: service on where asked (the coordinator
unless --no-relay, members with `pmnode join --relay`), the operator's per-circuit limits, and
reservations on the trusted relays at once (no relay discovery).

Measured with hivemind 1.1.12's p2pd (benchmarks/nat_bench.py, benchmarks/circuit_probe.py): the relay
service and limit flags have no effect. Every p2pd with relay transport on also serves as a relay, and
every circuit gets go-libp2p's default limits, about 128 KiB each way and 2 minutes, then the relay
resets it. So a relayed node is reached through circuits only for small calls (hello, a DHT lookup), and for
training traffic over connections it opens itself (`reach_out`) to the reachable peers that call it.
Two members that are both behind NAT exchange their training traffic through the relay's own
plain connections instead: net.tunnel routes each pmnode RPC to the relay, and net.forwarder there
re-issues it to the target over the connection the target keeps to the relay (no circuit, no cap).
hivemind's averager, in its own process, takes the same routes (swarm.guarded_averager); a partner
with no route yet is reached over a fresh circuit each round (`fresh_circuits`), which carries a
small stage's round only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable
from typing import Any

import base58
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
from pydantic import BaseModel, ConfigDict, Field

from pmnode.errors import PmnodeError
from pmnode.net.routing import StageRecord

_ORIGINAL = P2P._make_process_args
_FLAGS: dict[str, object] = {}


class RelayLimits(BaseModel):
    """What one relayed connection (circuit) may use before the relay resets it."""

    model_config = ConfigDict(extra="forbid")

    serve: bool = Field(False, description="Take reservations and relay circuits for other peers.")
    time_limit_s: float = Field(1800.0, gt=0, description="Seconds a circuit may stay open.")
    data_limit: int = Field(4 * 2**30, gt=0, description="Bytes a circuit may carry each way.")
    max_circuits: int = Field(16, gt=0, description="Open circuits per relayed peer.")


def relay_limits(serve: bool, time_limit: str, data_limit: str) -> RelayLimits:
    """From the command line: '30m', '90s', '1h' and '4GB', '512MB'; one clear line when unreadable."""
    from pmnode.core.sizing import parse_size

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*", time_limit.lower())
    if not found:
        raise PmnodeError(f"cannot read {time_limit!r} as a duration: write e.g. 90s, 30m or 1h")
    seconds = float(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[found.group(2)]
    return RelayLimits(serve=serve, time_limit_s=max(seconds, 1.0), data_limit=parse_size(data_limit))


def _with_flags(*args: object, **kwargs: object) -> list[str]:
    out: list[str] = _ORIGINAL(*args, **{**kwargs, **_FLAGS})
    return out


def configure_daemon(limits: RelayLimits) -> None:
    """Flags for every p2pd started after this (the DHT's child process inherits them at fork)."""
    _FLAGS.clear()
    _FLAGS.update(
        relayService=limits.serve,
        relayTimeLimit=f"{int(limits.time_limit_s)}s",
        relayDataLimit=limits.data_limit,
        relayMaxCircuits=limits.max_circuits,
        # Reserve on the trusted relays at once: with discovery on, p2pd's autorelay waits for four
        # candidates or three minutes before it reserves, and two relayed peers cannot meet until then.
        relayDiscovery=False,
    )
    P2P._make_process_args = staticmethod(_with_flags)


def relayed_options(relays: list[str]) -> dict[str, Any]:  # P2P.create keywords
    """DHT/p2pd options of a node behind NAT: reserve a slot on these relays and announce the circuit."""
    return {
        "use_relay": True,
        "use_auto_relay": True,
        "force_reachability": "private",
        "trusted_relays": relays,
        "nat_port_map": False,
        "auto_nat": False,
    }


def circuit_addrs(relays: list[str]) -> list[str]:
    """The relayed addresses this node announces: one circuit per relay it may reserve a slot on.

    p2pd's identify does not list circuit addresses, so they are built here; the reservation itself
    is made by p2pd's autorelay within seconds, and a caller that dials before it is a failed route
    that backs off and tries again."""
    return [f"{r}/p2p-circuit" for r in relays][:8]


def to_multiaddr(text: str) -> Multiaddr:
    """A multiaddr p2pd can read: the installed `multiaddr` encodes /p2p/ ids as CIDs, which p2pd's
    control protocol refuses ("length greater than remaining"), so they go as raw multihashes."""
    out = b""
    for i, part in enumerate(re.split(r"(/p2p/[^/]+)", text)):
        if not part:
            continue
        if i % 2:
            mh = base58.b58decode(part.removeprefix("/p2p/"))
            out += b"\xa5\x03" + bytes([len(mh)]) + mh  # code 421 (p2p), varint length, multihash
        else:
            out += Multiaddr(part).to_bytes()
    return Multiaddr(out)


async def _dial(p2p: P2P, records: Iterable[StageRecord], reach: str, timeout: float) -> None:
    """Connect to every other peer of `records` announced as `reach`, at its announced addresses."""
    me = p2p.peer_id.to_base58()

    async def one(r: StageRecord) -> None:
        with contextlib.suppress(Exception):
            peer = PeerID.from_base58(r.peer_id)
            await asyncio.wait_for(p2p._client.connect(peer, [to_multiaddr(a) for a in r.addrs]), timeout)

    await asyncio.gather(*(one(r) for r in records if r.reach == reach and r.addrs and r.peer_id != me))


async def connect_known(p2p: P2P, records: Iterable[StageRecord], timeout: float = 5.0) -> None:
    """Give the daemon the relayed peers' circuit addresses, so a call by peer id finds them (the
    libp2p DHT may not have them yet) and a circuit the relay closed is dialed again."""
    await _dial(p2p, records, "relayed", timeout)


async def reach_out(p2p: P2P, records: Iterable[StageRecord], timeout: float = 5.0) -> None:
    """Behind NAT: open a connection to each directly reachable peer that calls us (the stage before,
    averaging partners). libp2p answers their calls over it, so they never need the relay, whose
    circuits hivemind's p2pd caps at 128 KiB each way (see the module docstring)."""
    await _dial(p2p, records, "direct", timeout)


async def fresh_circuits(p2p: P2P, records: Iterable[StageRecord], timeout: float = 5.0) -> None:
    """Both behind NAT: close the circuit to each relayed peer whose id sorts after ours and dial a new
    one, so the next exchange (an averaging round) starts with the whole per-circuit allowance. Only
    the lower id of a pair redials: if both did, each could close the circuit the other just opened."""
    me = p2p.peer_id.to_base58()
    later = [r for r in records if r.reach == "relayed" and r.addrs and r.peer_id > me]

    async def one(r: StageRecord) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p2p._client.disconnect(PeerID.from_base58(r.peer_id)), timeout)

    await asyncio.gather(*(one(r) for r in later))
    await connect_known(p2p, later, timeout)
