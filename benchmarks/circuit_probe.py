"""How much one relayed libp2p connection (circuit) carries before the relay resets it.

Three roles, each in its own process (and, in benchmarks/nat_bench.py, its own network namespace):

    python -m benchmarks.circuit_probe relay HOST            # prints: RELAY <maddr>
    python -m benchmarks.circuit_probe serve HOST RELAY      # behind NAT; prints: PEER <id>
    python -m benchmarks.circuit_probe dial HOST RELAY PEER  # prints one JSON line (CircuitProbe)

The dialer opens a circuit to the served peer through the relay and echoes `chunk` bytes at a time
until a call fails; the bytes sent up to then are what one circuit carries each way. The relay is
started with pmnode's relay flags (net.relay.configure_daemon), so what it measures is what a
coordinator's relay does.
"""

from __future__ import annotations

import asyncio
import sys
import time

from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from pydantic import BaseModel

from pmnode.net.relay import RelayLimits, configure_daemon, relayed_options, to_multiaddr

ECHO = "pmnode.circuit_probe.echo"


class CircuitProbe(BaseModel):
    chunk: int
    bytes_each_way: int  # echoed before the first failure (or the cap)
    calls: int
    seconds: float
    error: str | None  # None: the cap was reached with no failure


def _quiet() -> dict[str, bool]:
    return {"nat_port_map": False, "auto_nat": False}


async def relay(host: str) -> None:
    configure_daemon(RelayLimits(serve=True))
    p2p = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], **_quiet())
    print("RELAY", (await p2p.get_visible_maddrs())[0], flush=True)
    await asyncio.Event().wait()


async def serve(host: str, relay_maddr: str) -> None:
    configure_daemon(RelayLimits())
    opts = relayed_options([relay_maddr])
    p2p = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], initial_peers=[relay_maddr], **opts)

    async def echo(req: averaging_pb2.AveragingData, _: object) -> averaging_pb2.AveragingData:
        return req

    await p2p.add_protobuf_handler(ECHO, echo, averaging_pb2.AveragingData)
    print("PEER", p2p.peer_id.to_base58(), flush=True)
    await asyncio.Event().wait()


async def dial(
    host: str, relay_maddr: str, peer: str, chunk: int = 16384, cap: int = 64 * 2**20
) -> CircuitProbe:
    configure_daemon(RelayLimits())
    p2p = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], initial_peers=[relay_maddr], **_quiet())
    target = PeerID.from_base58(peer)
    circuit = to_multiaddr(f"{relay_maddr}/p2p-circuit")
    for _ in range(20):  # the served peer's reservation may take a moment
        try:
            await asyncio.wait_for(p2p._client.connect(target, [circuit]), 5)
            break
        except Exception:
            await asyncio.sleep(0.5)
    msg = averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=b"\0" * chunk))
    sent, calls, error, t0 = 0, 0, None, time.monotonic()
    while sent < cap:
        try:
            await asyncio.wait_for(
                p2p.call_protobuf_handler(target, ECHO, msg, averaging_pb2.AveragingData), 10
            )
        except Exception as e:
            error = str(e) or type(e).__name__
            break
        sent, calls = sent + chunk, calls + 1
    return CircuitProbe(
        chunk=chunk, bytes_each_way=sent, calls=calls, seconds=time.monotonic() - t0, error=error
    )


def main(argv: list[str]) -> None:
    role, host, *rest = argv
    if role == "relay":
        asyncio.run(relay(host))
    elif role == "serve":
        asyncio.run(serve(host, rest[0]))
    elif role == "dial":
        print(asyncio.run(dial(host, rest[0], rest[1])).model_dump_json(), flush=True)
    else:
        raise SystemExit(f"unknown role {role!r}: relay, serve or dial")


if __name__ == "__main__":
    main(sys.argv[1:])
