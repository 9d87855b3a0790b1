"""Starting a node's DHT the way its reachability allows: direct, through a relay, or outbound only."""

from __future__ import annotations

from typing import Any

from hivemind import DHT
from rich.console import Console

from pmnode.net.dht import start_dht
from pmnode.net.reach import Reachability, decide, free_port, is_local, probe, tcp_target
from pmnode.net.relay import RelayLimits, circuit_addrs, configure_daemon, relayed_options
from pmnode.swarm.options import NodeOptions


def start_network(opts: NodeOptions, console: Console) -> tuple[DHT, Reachability]:
    """Check reachability (not on loopback: a local swarm is reachable by construction), then start the
    DHT: plain when dialed back, with a relay reservation when not, as a DHT client for an unreachable
    head. Runs outside any event loop, like start_dht."""
    o = opts
    configure_daemon(RelayLimits(serve=o.relay))
    if is_local(o.host):
        dht = start_dht([o.coordinator], o.host, o.port, announce=o.announce)
        return dht, Reachability(mode="direct", addrs=_direct_addrs(dht, o))
    port = o.port or free_port(o.host)
    token = o.token.get_secret_value() if o.token else ""
    reach = decide(probe(o.coordinator, o.host, port, o.announce, token), port, o.stage)
    extra: dict[str, Any] = {}  # start_dht keywords
    if reach.mode == "relayed":
        extra = relayed_options(reach.relays)
    elif reach.mode == "outbound":
        extra = {"client_mode": True}
    dht = start_dht([o.coordinator], o.host, port, announce=o.announce, **extra)
    if reach.mode == "relayed":
        reach.addrs = circuit_addrs(reach.relays)
        console.print(f"not reachable from outside: serving through the relay {_relay_of(reach.addrs[0])}")
    elif reach.mode == "outbound":
        console.print("not reachable from outside: the head needs no inbound connection; outbound only")
    else:
        reach.addrs = _direct_addrs(dht, o)
    return dht, reach


def _direct_addrs(dht: DHT, o: NodeOptions) -> list[str]:
    if o.announce:
        return list(o.announce)[:8]
    found = [str(m) for m in dht.get_visible_maddrs()]
    return [m for m in found if (t := tcp_target(m)) and (is_local(o.host) or not is_local(t[0]))][:8]


def _relay_of(circuit: str) -> str:
    return circuit.split("/p2p-circuit")[0]
