"""pmnode.net.transport between two real p2pd daemons on 127.0.0.1: unary, streamed, refused, counted."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from hivemind.p2p import P2P

from pmnode.core.codecs import Packet
from pmnode.net.meta import ActivationMeta, ErrorMeta, GradientMeta, Meta
from pmnode.net.serving import serve
from pmnode.net.transport import (
    UNARY_LIMIT,
    TransportError,
    TransportStats,
    call,
    request,
)
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, WireLimits, decode, encode

# localhost only: no UPnP port mapping, no AutoNAT probes
P2P_OPTS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False}
FORWARD, BACKWARD = "test-run.forward", "test-run.backward"
Scenario = Callable[[Tunnel, Tunnel, TransportStats, TransportStats], Awaitable[None]]


def _header(meta: Meta | None = None, mb: str = "0:0") -> MessageHeader:
    return MessageHeader.of(meta or ActivationMeta(), run="test-run", micro_batch=mb, stage=0, step=0)


def answer(request: MessageHeader, *tags: object) -> MessageHeader:
    """A test handler's reply: a gradient addressed like the request, with `tags` in its micro-batch."""
    mb = "|".join([request.micro_batch, *map(str, tags)])
    return MessageHeader.of(
        GradientMeta(), run=request.run, micro_batch=mb, stage=request.stage, step=request.step
    )


def reason(header: MessageHeader) -> str:
    return header.meta.reason if isinstance(header.meta, ErrorMeta) else header.kind


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


async def _echo(header: MessageHeader, packet: Packet, peer_id: str) -> tuple[MessageHeader, Packet]:
    """Sends the tensors back untouched, plus one transformed tensor, as the 'gradient'."""
    out = dict(packet.tensors)
    if "v" in out:
        out["neg"] = -out["v"]
    return answer(header, peer_id[-8:], len(packet.tensors)), Packet(out)


async def _fail(header: MessageHeader, packet: Packet, peer_id: str) -> tuple[MessageHeader, Packet]:
    raise RuntimeError("stage exploded")


def _p2pd_children() -> list[int]:
    """p2pd processes whose parent is this test process (other daemons on the machine are not ours)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if comm == "p2pd" and int(rest[1]) == os.getpid() and rest[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _run(scenario: Scenario, timeout: float = 60.0) -> tuple[TransportStats, TransportStats]:
    """Two daemons, the second bootstrapped from the first; `a` serves both RPCs; always shut down."""
    server_stats, client_stats = TransportStats(), TransportStats()
    pids: list[int] = []

    async def main() -> None:
        a = await P2P.create(**P2P_OPTS)
        pids.append(a._child.pid)
        b = None
        try:
            b = await P2P.create(initial_peers=await a.get_visible_maddrs(), **P2P_OPTS)
            pids.append(b._child.pid)
            assert set(pids) <= set(_p2pd_children())  # the orphan check below can see our daemons
            ta, tb = Tunnel(a), Tunnel(b)  # one per P2P, as a node has
            for name in (FORWARD, BACKWARD):
                await serve(ta, name, _echo, server_stats)
            await serve(ta, "test-run.pmnode.fail", _fail, server_stats)
            await asyncio.wait_for(scenario(ta, tb, server_stats, client_stats), timeout)
        finally:
            if b is not None:
                await b.shutdown()
            await a.shutdown()

    asyncio.run(main())
    assert not [p for p in pids if p in _p2pd_children()], "p2pd outlived its P2P"
    return server_stats, client_stats


def test_small_message_goes_unary() -> None:
    packet = Packet(
        {"v": torch.randn(2, 16, 8).to(torch.bfloat16), "tokens": torch.arange(32).to(torch.uint16)}
    )
    data = encode(_header(), packet)
    replies: list[bytes] = []

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        replies.append(await call(b, a.p2p.peer_id.to_base58(), FORWARD, data, timeout=10, stats=cli))
        header, reply = await request(
            b, a.p2p.peer_id, BACKWARD, _header(GradientMeta(), "0:1"), packet, cli, 10
        )
        assert header.kind == "gradient" and header.micro_batch == f"0:1|{b.p2p.peer_id.to_base58()[-8:]}|2"
        assert _bits(reply.tensors["neg"]) == _bits(-packet.tensors["v"])

    srv, cli = _run(scenario)
    header, reply = decode(replies[0])
    assert header.kind == "gradient" and header.micro_batch.endswith("|2")
    for k, t in packet.tensors.items():
        assert reply.tensors[k].dtype == t.dtype and _bits(reply.tensors[k]) == _bits(t)
    # exact counts: what left the client is what reached the server, and back
    assert cli.bytes_sent["forward"] == srv.bytes_received["forward"] == len(data)
    assert cli.bytes_received["forward"] == srv.bytes_sent["forward"] == len(replies[0])
    assert cli.payload_sent["forward"] == packet.nbytes
    assert cli.messages_sent == srv.messages_received == {"forward": 1, "backward": 1}
    assert not cli.streamed and not srv.streamed and not cli.errors and not srv.errors
    assert 0 < cli.proto_bytes_sent["forward"] - len(data) <= 8  # protobuf: a tag and a length varint
    assert (
        cli.proto_bytes_sent == srv.proto_bytes_received and cli.proto_bytes_received == srv.proto_bytes_sent
    )


def test_5mib_message_is_streamed_bit_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(5 * 2**20 // 4, generator=gen)  # 5 MiB of float32
    v[:4] = torch.tensor([-0.0, 1e-45, 3.4e38, -1.0])  # signed zero and a subnormal must survive too
    packet = Packet({"v": v, "tokens": torch.randint(0, 2**16, (4, 512), generator=gen).to(torch.uint16)})
    data = encode(_header(), packet)
    assert len(data) > 5 * 2**20 > UNARY_LIMIT
    replies: list[bytes] = []

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        replies.append(await call(b, a.p2p.peer_id, FORWARD, data, timeout=30, stats=cli))

    srv, cli = _run(scenario)
    header, reply = decode(replies[0])
    assert header.kind == "gradient"
    assert _bits(reply.tensors["v"]) == _bits(v) and _bits(reply.tensors["neg"]) == _bits(-v)
    assert _bits(reply.tensors["tokens"]) == _bits(packet.tensors["tokens"])
    assert cli.bytes_sent["forward"] == srv.bytes_received["forward"] == len(data)
    assert cli.bytes_received["forward"] == srv.bytes_sent["forward"] == len(replies[0])
    assert cli.streamed["forward"] == srv.streamed["forward"] == 1
    chunks = -(-len(data) // 2**20)
    assert len(data) < cli.proto_bytes_sent["forward"] <= len(data) + 5 * chunks


def test_large_reply_to_small_request_is_fetched_once() -> None:
    calls: list[str] = []

    async def grow(header: MessageHeader, packet: Packet, peer_id: str) -> tuple[MessageHeader, Packet]:
        calls.append(header.micro_batch)  # must run once even though the reply cannot go unary
        return answer(header), Packet({"g": torch.arange(3 * 2**20, dtype=torch.int32)})

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        await serve(a, "test-run.pmnode.grow", grow, srv)
        _, reply = await request(b, a.p2p.peer_id, "test-run.pmnode.grow", _header(), Packet({}), cli, 30)
        assert torch.equal(reply.tensors["g"], torch.arange(3 * 2**20, dtype=torch.int32))

    srv, cli = _run(scenario)
    assert calls == ["0:0"]
    assert cli.bytes_received["grow"] == srv.bytes_sent["grow"] > 12 * 2**20
    assert cli.streamed["grow"] == 1 and not srv.errors


def test_garbage_gets_an_error_reply_and_the_server_keeps_serving() -> None:
    good = encode(_header(), Packet({"v": torch.ones(4)}))
    garbage = [b"\x00\x01", b"\xff" * 64, encode(_header(), Packet({"v": torch.ones(4)}))[:-1]]

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        for i, junk in enumerate(garbage):
            header, packet = decode(await call(b, a.p2p.peer_id, FORWARD, junk, timeout=10, stats=cli))
            assert header.kind == "error" and not packet.tensors
            assert reason(header).split(":")[0] in ("too short", "bad header length", "size mismatch")
            assert srv.errors["forward"] == i + 1
            header, packet = decode(await call(b, a.p2p.peer_id, FORWARD, good, timeout=10, stats=cli))
            assert header.kind == "gradient" and torch.equal(packet.tensors["neg"], -torch.ones(4))
        try:  # a raising handler is an error reply too, with the request's address
            await request(b, a.p2p.peer_id, "test-run.pmnode.fail", _header(mb="7:1"), Packet({}), cli, 10)
            raise AssertionError("an error reply must raise")
        except TransportError as e:
            assert "stage exploded" in str(e)
        header, _ = decode(await call(b, a.p2p.peer_id, BACKWARD, good, timeout=10, stats=cli))
        assert header.kind == "gradient"

    srv, cli = _run(scenario)
    assert srv.errors == {"forward": 3, "fail": 1}
    assert srv.error_reasons == {
        "too short": 1,
        "bad header length": 1,
        "size mismatch": 1,
        "handler: RuntimeError": 1,
    }
    assert (
        cli.bytes_sent["forward"] == srv.bytes_received["forward"] == sum(map(len, garbage)) + 3 * len(good)
    )
    assert cli.bytes_received == srv.bytes_sent
    assert not cli.errors


def test_unreachable_rpc_times_out_cleanly() -> None:
    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        big = encode(_header(), Packet({"v": torch.zeros(2**19)}))  # 2 MiB: takes the stream path
        for data in (encode(_header(), Packet({})), big):
            try:
                await call(b, a.p2p.peer_id, "test-run.pmnode.nobody", data, timeout=2, stats=cli)
                raise AssertionError("a call to an unregistered rpc must fail")
            except TransportError:
                pass
        assert cli.errors["nobody"] == 2

    _, cli = _run(scenario)
    print(cli.error_reasons)


def test_oversized_stream_is_cut_off() -> None:
    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        await serve(a, "test-run.pmnode.small", _echo, srv, WireLimits(max_bytes=2 * 2**20))
        data = encode(_header(), Packet({"v": torch.zeros(2**20)}))  # 4 MiB
        try:
            header, _ = decode(
                await call(b, a.p2p.peer_id, "test-run.pmnode.small", data, timeout=10, stats=cli)
            )
            assert header.kind == "error" and reason(header).startswith("too large")
        except TransportError:
            pass  # the server hung up mid-stream; either way nothing was buffered past the limit
        assert srv.error_reasons["too large"] == 1
        ok = encode(_header(), Packet({"v": torch.ones(8)}))
        header, _ = decode(await call(b, a.p2p.peer_id, "test-run.pmnode.small", ok, timeout=10, stats=cli))
        assert header.kind == "gradient"

    _run(scenario)


def test_no_p2pd_left_behind() -> None:
    """A scenario of its own, so the check does not depend on which tests ran before it in this worker
    (under -n 2 the others may run elsewhere, or later): every daemon it started, and anything those
    started, is gone when it ends; daemons of this worker that were there before are not counted."""
    before = set(_p2pd_children())
    started: list[int] = []

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        started.extend(set(_p2pd_children()) - before)
        ok = encode(_header(), Packet({"v": torch.zeros(2, 3)}))
        assert decode(await call(b, a.p2p.peer_id, FORWARD, ok, timeout=10, stats=cli))[0].kind == "gradient"

    _run(scenario)
    assert len(started) == 2  # both of the scenario's daemons were seen while it ran...
    assert set(_p2pd_children()) <= before  # ...and none of them, nor anything new, is left


def test_guard_refuses_before_decoding_and_bans_garbage() -> None:
    from hivemind.utils.crypto import RSAPrivateKey

    from pmnode.net.auth import Guard, Verifier, issue_cert, public_bytes

    authority = RSAPrivateKey()
    guard = Guard(
        Verifier("test-run", public_bytes(authority)),
        stage=1,
        rate=1e6,
        burst=100,
        ban_after=3,
        ban_seconds=60,
    )
    good = encode(_header(), Packet({"v": torch.randn(2, 3)}))
    got: list[str] = []

    async def scenario(a: Tunnel, b: Tunnel, srv: TransportStats, cli: TransportStats) -> None:
        handled: list[str] = []

        async def handler(header: MessageHeader, packet: Packet, peer: str) -> tuple[MessageHeader, Packet]:
            handled.append(header.micro_batch)
            return answer(header), Packet({})

        await serve(a, "test-run.guarded", handler, srv, guard=guard)

        async def send(data: bytes) -> str:
            header, _ = decode(await call(b, a.p2p.peer_id, "test-run.guarded", data, timeout=10, stats=cli))
            return reason(header)

        got.append(await send(good))  # not a member yet
        me = b.p2p.peer_id.to_base58()
        guard.hello(issue_cert(authority, "test-run", me, 0, public_bytes(authority)), me)
        got.append(await send(good))
        got.extend([(await send(b"\x00garbage")).split(":")[0] for _ in range(3)])
        got.append(await send(good))  # banned now: even a good message is refused
        assert handled == ["0:0"]

    srv, _ = _run(scenario)
    assert got == ["unauthorized", "gradient", *["bad header length"] * 3, "banned"]
    assert srv.error_reasons["unauthorized"] == 1 and srv.error_reasons["banned"] == 1 and guard.bans == 1
