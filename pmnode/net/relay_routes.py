"""Which relayed peers a node reaches through a relay's forwarder (net.tunnel), kept fresh each heartbeat.

A peer announced as relayed is called through the relay of its first circuit address unless a plain
connection to it is open already (it dialed us: net.relay.reach_out), which is faster and costs the
relay nothing. The node shows its certificate to every relay it uses and to the relays it is served
through itself, so each relay knows both ends of every call it forwards; a relay that does not answer
is not used until a later heartbeat finds it again, and the calls meant for its peers go straight to
the circuit (a failed route at worst, which downstream.send handles like any other).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable

from hivemind.p2p import PeerID

from pmnode.net import tunnel
from pmnode.net.auth import Cert
from pmnode.net.control import Ack, ControlError, Hello, call_json
from pmnode.net.relay import to_multiaddr
from pmnode.net.routing import StageRecord

HELLO_TIMEOUT = 5.0


def relay_of(circuit: str) -> str:
    """The relay's multiaddr in a circuit address '<relay>/p2p-circuit[...]'."""
    return circuit.split("/p2p-circuit")[0]


def peer_of(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[-1]


class RelayRoutes:
    def __init__(self, tun: tunnel.Tunnel, cert: Callable[[], Cert], own_relays: Iterable[str] = ()):
        self.tunnel, self.p2p, self.cert = tun, tun.p2p, cert
        self.own = list(own_relays)  # relays this node is served through (it must be known there)
        self.unreachable: set[str] = set()  # relays whose hello failed at the last refresh
        if self.own:
            tun.trust_relays(self.own)

    async def _plain_peers(self) -> set[str]:
        """Peers with an open connection that is not a relayed circuit."""
        with contextlib.suppress(Exception):
            return {
                p.peer_id.to_base58()
                for p in await self.p2p.list_peers()
                if any("p2p-circuit" not in str(a) for a in p.addrs)
            }
        return set()

    async def _greet(self, relay: str) -> bool:
        """Connect to the relay and show it our certificate; False if it cannot be used now."""
        peer = PeerID.from_base58(peer_of(relay))
        try:
            with contextlib.suppress(Exception):  # already connected, or it answers on another address
                await asyncio.wait_for(self.p2p._client.connect(peer, [to_multiaddr(relay)]), HELLO_TIMEOUT)
            await call_json(
                self.tunnel, peer, tunnel.RELAY_HELLO, Hello(cert=self.cert()), Ack, HELLO_TIMEOUT
            )
            return True
        except (ControlError, ValueError):
            return False

    async def refresh(self, records: Iterable[StageRecord]) -> dict[str, str]:
        """Set the routes for these peers' records; return them (peer id -> relay peer id)."""
        me = self.p2p.peer_id.to_base58()
        plain = await self._plain_peers()
        wanted = {
            r.peer_id: relay_of(r.addrs[0])
            for r in records
            if r.reach == "relayed" and r.addrs and r.peer_id != me and r.peer_id not in plain
        }
        relays = sorted(set(wanted.values()) | set(self.own))
        ok = await asyncio.gather(*(self._greet(r) for r in relays))
        self.unreachable = {r for r, good in zip(relays, ok, strict=True) if not good}
        routes = {p: peer_of(r) for p, r in wanted.items() if r not in self.unreachable}
        self.tunnel.set_routes(routes)
        return routes
