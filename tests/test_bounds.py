"""Bounded everything: a stream message announcing 4 GB is refused at every door before it is read
(memory of the attacked process grows < 64 MB), a streamed reply stops at the caller's limit, a bulk
manifest cannot make the receiver allocate more than it expects, and per-peer tables stay bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.core.codecs import Packet
from pmnode.core.snapshot_meta import SumsMeta
from pmnode.net import auth, bounded, tunnel
from pmnode.net.auth import Guard, Verifier, public_bytes
from pmnode.net.bulk import BulkManifest, TransferError, check_manifest, fetch
from pmnode.net.forwarder import Forwarder
from pmnode.net.meta import ActivationMeta, BulkOpen, BulkRequest, GradientMeta
from pmnode.net.serving import serve
from pmnode.net.transport import TransportError, TransportStats, call
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, encode

P2P_OPTS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False}
RUN = "bound-run"
SENT = 96 * 2**20  # bytes an attacker pushes after its announcement, per door


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _echo(header: MessageHeader, packet: Packet, caller: str) -> tuple[MessageHeader, Packet]:
    """A reply of `grow` bytes (the request's samples, when above 1)."""
    n = header.meta_as(ActivationMeta).samples
    reply = MessageHeader.of(GradientMeta(), run=RUN, micro_batch="0:0", stage=1, step=0)
    return reply, Packet({"big": torch.ones(n, dtype=torch.uint8)} if n > 1 else {})


def _header(grow: int = 1) -> MessageHeader:
    return MessageHeader.of(ActivationMeta(samples=grow), run=RUN, micro_batch="0:0", stage=0, step=0)


async def _announce_4gb(attacker: P2P, target: P2P, door: str) -> int:
    """Open `door`, announce a 4 GB first message and push up to SENT bytes of it until hung up on."""
    _, _reader, writer = await attacker.call_binary_stream_handler(target.peer_id, door)
    writer.write(P2P.MESSAGE_MARKER + (4 * 2**30).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    block, pushed = bytes(2**20), 0
    try:
        while pushed < SENT:
            writer.write(block)
            await asyncio.wait_for(writer.drain(), 10)
            pushed += len(block)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass  # the target hung up: what we expect
    finally:
        writer.close()
    return pushed


def test_a_4gb_announcement_is_refused_at_every_door() -> None:
    async def main() -> None:
        target = await P2P.create(**P2P_OPTS)
        attacker = await P2P.create(initial_peers=await target.get_visible_maddrs(), **P2P_OPTS)
        try:
            served = Tunnel(target)  # the target's one tunnel: its doors and the relay's
            await serve(served, f"{RUN}.forward", _echo, TransportStats())
            await Forwarder(served, Verifier(RUN, public_bytes(RSAPrivateKey()))).serve()
            doors = [tunnel.VIA_STREAM, tunnel.RELAY_STREAM, f"{RUN}.forward.stream"]
            before, refused = _rss(), sum(bounded.REFUSED.values())
            for door in doors:
                await _announce_4gb(attacker, target, door)
            for _ in range(100):  # the target's side of each stream reads its header, then refuses
                if sum(bounded.REFUSED.values()) - refused >= len(doors):
                    break
                await asyncio.sleep(0.05)
            grown = _rss() - before
            print(f"RSS grew {grown / 2**20:.1f} MiB after {len(doors)} doors x 4 GB announced")
            assert sum(bounded.REFUSED.values()) - refused == len(doors)
            assert grown < 64 * 2**20
            ok = encode(_header(), Packet({}))  # and the target still serves
            assert await call(Tunnel(attacker), target.peer_id, f"{RUN}.forward", ok, timeout=10)
        finally:
            await attacker.shutdown()
            await target.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_streamed_reply_stops_at_the_callers_limit() -> None:
    async def main() -> None:
        server = await P2P.create(**P2P_OPTS)
        client = await P2P.create(initial_peers=await server.get_visible_maddrs(), **P2P_OPTS)
        try:
            await serve(Tunnel(server), f"{RUN}.forward", _echo, TransportStats())
            caller = Tunnel(client)
            big = encode(_header(grow=8 * 2**20), Packet({}))  # an 8 MiB reply: parked, then fetched
            stats = TransportStats()
            with pytest.raises(TransportError, match="exceeds"):
                await call(caller, server.peer_id, f"{RUN}.forward", big, 20, stats, max_reply=2**21)
            assert stats.error_reasons["transport: ReplyTooLarge"] == 1
            assert len(await call(caller, server.peer_id, f"{RUN}.forward", big, 20)) > 8 * 2**20
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def _manifest(size: int, chunk: int = 2**20, n: int | None = None) -> BulkManifest:
    n = -(-size // chunk) if n is None else n
    return BulkManifest(
        ticket="t",
        size=size,
        chunk=chunk,
        chunks=["0" * 64] * n,
        tensors=[],
        meta=SumsMeta(step=0, samples=0),
    )


def test_a_bulk_manifest_cannot_ask_for_more_than_the_receiver_expects() -> None:
    check_manifest(_manifest(3 * 2**20), max_size=4 * 2**20)
    with pytest.raises(TransferError, match="announces"):
        check_manifest(_manifest(4 * 2**30, n=1), max_size=4 * 2**20)
    with pytest.raises(TransferError, match="do not make"):
        check_manifest(_manifest(3 * 2**20, n=1), max_size=4 * 2**20)
    with pytest.raises(TransferError, match="do not make"):
        check_manifest(_manifest(0, chunk=0, n=0), max_size=4 * 2**20)
    asked: list[str] = []

    async def ask(peer: str, req: BulkRequest) -> Packet:
        asked.append(req.kind)
        body = _manifest(4 * 2**30, n=1).model_dump_json().encode()
        return Packet({"manifest": torch.frombuffer(bytearray(body), dtype=torch.uint8)})

    before = _rss()
    with pytest.raises(TransferError, match="no sender completed"):
        asyncio.run(fetch(ask, ["liar"], BulkOpen(), SumsMeta, max_size=2**20))
    assert asked == ["open"] and _rss() - before < 64 * 2**20  # no chunk asked, nothing allocated


def test_per_peer_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_PEERS", 16)
    guard = Guard(
        Verifier(RUN, public_bytes(RSAPrivateKey())), 1, rate=1.0, burst=2, ban_after=1, ban_seconds=60
    )
    for i in range(100):
        guard.strike(f"peer{i}")  # each one's first strike bans it
        guard.admit(f"peer{i}")
    assert len(guard.strikes) <= 16 and len(guard.banned) <= 16 and len(guard.buckets) <= 16
    assert guard.bans == 100 and "peer99" in guard.banned


def test_parked_replies_are_bounded() -> None:
    from hivemind.p2p import P2PContext, PeerID
    from hivemind.proto import runtime_pb2

    from pmnode.net.serving import MAX_PARKED, _Server
    from pmnode.net.transport import TICKET
    from pmnode.net.wire import WireLimits

    srv = _Server("me", f"{RUN}.forward", _echo, TransportStats(), WireLimits(), None, None)
    peer = PeerID.from_base58("QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN")
    ctx = P2PContext(handle_name=f"{RUN}.forward", local_id=peer, remote_id=peer)
    big = runtime_pb2.ExpertRequest(metadata=encode(_header(grow=2 * 2**20), Packet({})))
    tickets = []
    for _ in range(3 * MAX_PARKED):  # a caller that asks for large replies and never fetches them
        resp = asyncio.run(srv.unary(big, ctx))
        assert resp.tensors[0].dtype == TICKET
        tickets.append(resp.tensors[0].buffer.decode())
    assert len(srv.parked) == MAX_PARKED and list(srv.parked) == tickets[-MAX_PARKED:]
