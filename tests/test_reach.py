"""Reachability at join and relay plumbing: the policy with fakes, the dial-back on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pmnode.errors import PmnodeError
from pmnode.net.reach import ReachReply, decide, dial_back, tcp_target
from pmnode.net.relay import circuit_addrs, relay_limits, to_multiaddr

RELAY = "/ip4/10.66.0.1/tcp/4000/p2p/QmdGa2ev4x8tt1crUkCFRYZ8KXbZDZkfk9jhNwFcLD46An"


def test_decide() -> None:
    assert decide(ReachReply(reachable=["/ip4/1.2.3.4/tcp/5"], relays=[RELAY]), 5, 1).mode == "direct"
    relayed = decide(ReachReply(reachable=[], relays=[RELAY]), 5, 1)
    assert (relayed.mode, relayed.relays) == ("relayed", [RELAY])
    assert decide(ReachReply(reachable=[], relays=[]), 5, 0).mode == "outbound"  # the head needs no inbound
    assert decide(ReachReply(reachable=[], relays=[RELAY]), 5, 0).mode == "outbound"  # nor a relay slot
    with pytest.raises(PmnodeError, match=r"cannot be reached from outside .* forward TCP port 5 .* relay"):
        decide(ReachReply(reachable=[], relays=[]), 5, 1)
    with pytest.raises(PmnodeError, match="no relay"):
        decide(ReachReply(reachable=[], relays=[]), 5, None)


def test_dial_back_finds_the_listening_port_only() -> None:
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
        up, down = listening.getsockname()[1], closed.getsockname()[1]
        addrs = [f"/ip4/127.0.0.1/tcp/{up}/p2p/x", f"/ip4/127.0.0.1/tcp/{down}", f"{RELAY}/p2p-circuit"]
        assert asyncio.run(dial_back(addrs, timeout=2)) == [addrs[0]]


def test_addresses() -> None:
    assert tcp_target("/ip4/10.0.0.2/tcp/31337/p2p/Qm") == ("10.0.0.2", 31337)
    assert tcp_target(f"{RELAY}/p2p-circuit") is None
    assert tcp_target("/ip4/10.0.0.2/udp/1/quic") is None
    assert circuit_addrs([RELAY]) == [f"{RELAY}/p2p-circuit"]
    # p2pd reads /p2p/ as a raw multihash (code 421, length 34), not the CID the multiaddr package writes
    raw = to_multiaddr(f"{RELAY}/p2p-circuit").to_bytes()
    assert raw.hex() == (
        "040a420001060fa0a503221220ddd3b0509a0a570be21cab549be23f2ae2b0001763a7c4763be6bee590245fc3a202"
    )


def test_relay_limits_from_the_command_line() -> None:
    lim = relay_limits(True, "90s", "512MB")
    assert (lim.serve, lim.time_limit_s, lim.data_limit) == (True, 90.0, 512 * 10**6)
    assert relay_limits(False, "30m", "4GiB").time_limit_s == 1800.0
    with pytest.raises(PmnodeError, match="as a duration"):
        relay_limits(True, "soon", "1GB")
