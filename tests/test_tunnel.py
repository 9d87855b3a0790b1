"""net.tunnel + net.forwarder on three real p2pd daemons on 127.0.0.1: a caller reaches a target
through a relay's forwarder, unary and streamed, both ways large; the target sees the real caller;
outsiders, untrusted relays and unknown targets are refused and counted; a hivemind servicer in a
second client of the target's daemon (as the averager) is reached the same way."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator  # noqa: UP035  hivemind reads typing's AsyncIterator off the hints

import pytest
import torch
from hivemind.p2p import P2P, P2PContext, P2PHandlerError, ServicerBase
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from pmnode.core.codecs import Packet
from pmnode.net import tunnel
from pmnode.net.auth import Cert, Verifier, issue_cert, public_bytes
from pmnode.net.callproof import Identity, Signer
from pmnode.net.control import Ack, ControlError, Hello, add_json_handler, call_json
from pmnode.net.forwarder import Forwarder
from pmnode.net.meta import ActivationMeta, GradientMeta
from pmnode.net.serving import serve
from pmnode.net.transport import UNARY_LIMIT, TransportError, TransportStats, request
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader, encode

P2P_OPTS = {"host_maddrs": ["/ip4/127.0.0.1/tcp/0"], "nat_port_map": False, "auto_nat": False}
RUN = "tun-run"
AUTHORITY = RSAPrivateKey()


def _cert(tun: Tunnel, stage: int = 1) -> Cert:
    return issue_cert(AUTHORITY, RUN, tun.p2p.peer_id.to_base58(), stage, public_bytes(RSAPrivateKey()))


def _header(mb: str = "0:0", samples: int = 1) -> MessageHeader:
    return MessageHeader.of(ActivationMeta(samples=samples), run=RUN, micro_batch=mb, stage=0, step=0)


async def _echo(header: MessageHeader, packet: Packet, caller: str) -> tuple[MessageHeader, Packet]:
    """The tensors back, and as many again if asked (samples > 1: a reply too large for a unary
    answer); the caller it saw as the reply's micro-batch."""
    out = dict(packet.tensors)
    if header.meta_as(ActivationMeta).samples > 1:
        out["big"] = torch.ones(UNARY_LIMIT // 2, dtype=torch.float32)
    return MessageHeader.of(GradientMeta(), run=RUN, micro_batch=caller, stage=1, step=0), Packet(out)


def _identify(tun: Tunnel, stage: int = 1) -> Identity:
    """What a node does at join: sign forwarded calls with its key, check those forwarded to it."""
    key = RSAPrivateKey()
    cert = issue_cert(AUTHORITY, RUN, tun.p2p.peer_id.to_base58(), stage, public_bytes(key))
    me = Identity(key, lambda: cert)
    tun.set_identity(me, Verifier(RUN, public_bytes(AUTHORITY)))
    return me


async def _three() -> tuple[Tunnel, Tunnel, Tunnel, Forwarder]:
    """A relay, a target and a caller: one P2P each, with its Tunnel."""
    relay = Tunnel(await P2P.create(**P2P_OPTS))
    peers = [str(m) for m in await relay.p2p.get_visible_maddrs()]
    target = Tunnel(await P2P.create(initial_peers=peers, **P2P_OPTS))
    caller = Tunnel(await P2P.create(initial_peers=peers, **P2P_OPTS))
    fwd = Forwarder(relay, Verifier(RUN, public_bytes(AUTHORITY)))
    await fwd.serve()
    for p in (target, caller):
        _identify(p)
    return relay, target, caller, fwd


def test_forwarded_calls_reach_the_target_as_the_caller() -> None:
    async def scenario() -> None:
        relay, target, caller, fwd = await _three()
        try:
            await serve(target, f"{RUN}.forward", _echo, TransportStats())

            async def who(req: Hello, peer: str) -> Ack:
                return Ack(ok=peer == caller.p2p.peer_id.to_base58())

            await add_json_handler(target, f"{RUN}.who", Hello, who)
            target.trust_relays([relay.p2p.peer_id.to_base58()])
            for p in (target, caller):
                await call_json(p, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=_cert(p)), Ack)
            caller.set_routes({target.p2p.peer_id.to_base58(): relay.p2p.peer_id.to_base58()})

            small = torch.arange(1000, dtype=torch.float32)
            stats = TransportStats()
            h, p = await request(
                caller, target.p2p.peer_id, f"{RUN}.forward", _header(), Packet({"v": small}), stats, 20
            )
            assert h.micro_batch == caller.p2p.peer_id.to_base58()  # the target saw the caller, not the relay
            assert torch.equal(p.tensors["v"], small)
            large = torch.randn(UNARY_LIMIT // 4 + 1000)  # > UNARY_LIMIT bytes: streamed through the relay
            h, p = await request(
                caller, target.p2p.peer_id, f"{RUN}.forward", _header("0:1"), Packet({"v": large}), stats, 30
            )
            assert torch.equal(p.tensors["v"], large)
            grow = _header("0:2", samples=2)  # a small call, a large reply
            h, p = await request(
                caller, target.p2p.peer_id, f"{RUN}.forward", grow, Packet({"v": small}), stats, 30
            )
            assert p.tensors["big"].numel() == UNARY_LIMIT // 2  # fetched by ticket, through the relay
            assert stats.streamed["forward"] == 2
            ack = await call_json(caller, target.p2p.peer_id, f"{RUN}.who", Hello(cert=_cert(caller)), Ack)
            assert ack.ok  # a JSON call too, with the caller's identity
            t = target
            assert t.forwarded[f"{RUN}.forward"] == 2 and t.forwarded[f"{RUN}.forward.stream"] == 1
            assert t.forwarded[f"{RUN}.forward.fetch"] == 1 and t.forwarded[f"{RUN}.who"] == 1
            key = target.p2p.peer_id.to_base58()
            assert fwd.counters.calls[key] == 5
            assert fwd.counters.bytes_in[key] > 4 * UNARY_LIMIT // 4 * 0.99  # the large upload passed through
            assert fwd.counters.bytes_out[key] > 3 * UNARY_LIMIT * 0.99  # and the large replies came back
        finally:
            for p in (caller, target, relay):
                await p.p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_refusals_are_counted() -> None:
    async def scenario() -> None:
        relay, target, caller, fwd = await _three()
        try:
            await serve(target, f"{RUN}.forward", _echo, TransportStats())
            caller.set_routes({target.p2p.peer_id.to_base58(): relay.p2p.peer_id.to_base58()})
            packet = Packet({"v": torch.ones(4)})

            async def send() -> None:
                await request(caller, target.p2p.peer_id, f"{RUN}.forward", _header(), packet, None, 10)

            with pytest.raises(TransportError):  # the caller showed no certificate to the relay
                await send()
            assert fwd.counters.refused["caller not a member"] == 1
            await call_json(caller, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=_cert(caller)), Ack)
            with pytest.raises(TransportError):  # the target did not either
                await send()
            assert fwd.counters.refused["target not a member"] == 1
            await call_json(target, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=_cert(target)), Ack)
            with pytest.raises(TransportError):  # the target does not trust this relay
                await send()
            assert target.refused["not our relay"] == 1
            target.trust_relays([relay.p2p.peer_id.to_base58()])
            await send()  # now it goes through
            forged = issue_cert(
                RSAPrivateKey(), RUN, caller.p2p.peer_id.to_base58(), 1, public_bytes(RSAPrivateKey())
            )
            with pytest.raises(ControlError):
                await call_json(caller, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=forged), Ack)
            stolen = _cert(target)  # another peer's certificate is no use either
            with pytest.raises(ControlError):
                await call_json(caller, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=stolen), Ack)
            assert fwd.counters.refused["unauthorized"] == 2
            # a peer that is not the target's relay cannot forward to it directly
            fake = tunnel.Request(uid=tunnel.route_uid(caller.p2p.peer_id.to_base58(), f"{RUN}.forward"))
            with pytest.raises(P2PHandlerError):
                await caller.p2p.call_protobuf_handler(
                    target.p2p.peer_id, tunnel.VIA_CALL, fake, tunnel.Response
                )
            assert target.refused["not our relay"] == 2
        finally:
            for p in (caller, target, relay):
                await p.p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))


class _Echo(ServicerBase):
    """A hivemind servicer with averaging's message types: unary in, stream out, and both ways."""

    async def rpc_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        for i in range(3):  # 3 x 512 KiB: more than a relay circuit carries
            yield averaging_pb2.DownloadData(metadata=bytes([i]) * 2**19)

    async def rpc_parts(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for msg in stream:
            sender = context.remote_id.to_bytes()
            yield averaging_pb2.AveragingData(group_id=sender, tensor_part=msg.tensor_part)


def test_a_hivemind_servicer_in_another_client_is_reached_through_the_relay() -> None:
    """As hivemind's averager: its own P2P client on the node's daemon, its own namespace and doors;
    its stubs take the routes (tunnel.Routed)."""

    async def scenario() -> None:
        relay, target, caller, _ = await _three()
        side = Tunnel(
            await target.p2p.replicate(target.p2p.daemon_listen_maddr)
        )  # the averager's client, same daemon
        try:
            svc = _Echo()
            await svc.add_p2p_handlers(side.p2p, namespace="tun-run.avg")
            for h in svc._rpc_handlers or ():
                name = svc._get_handle_name("tun-run.avg", h.method_name)
                fn = getattr(svc, h.method_name)
                await side.add_handler(
                    name,
                    fn,
                    input_type=h.request_type,
                    stream_input=h.stream_input,
                    stream_output=h.stream_output,
                    registered=True,
                )
            arrived: list[str] = []
            side.on_arrival = arrived.append
            _identify(side)  # the averager's process gets the node's identity too (use_tunnel)
            side.trust_relays([relay.p2p.peer_id.to_base58()])
            await serve(target, f"{RUN}.forward", _echo, TransportStats())  # the node's own doors too
            for p in (target, caller):
                await call_json(p, relay.p2p.peer_id, tunnel.RELAY_HELLO, Hello(cert=_cert(p)), Ack)
            caller.set_routes({target.p2p.peer_id.to_base58(): relay.p2p.peer_id.to_base58()})

            stub = _Echo.get_stub(tunnel.Routed(caller), target.p2p.peer_id, namespace="tun-run.avg")
            got = [m.metadata async for m in await stub.rpc_state(averaging_pb2.DownloadRequest())]
            assert [len(b) for b in got] == [2**19] * 3 and got[2][:1] == b"\x02"

            async def parts() -> AsyncIterator[averaging_pb2.AveragingData]:
                for i in range(4):
                    part = runtime_pb2.Tensor(buffer=bytes([i]) * 2**18)
                    yield averaging_pb2.AveragingData(tensor_part=part)

            back = [m async for m in await stub.rpc_parts(parts())]
            assert [m.tensor_part.buffer[:1] for m in back] == [b"\x00", b"\x01", b"\x02", b"\x03"]
            assert all(m.group_id == caller.p2p.peer_id.to_bytes() for m in back)  # the caller, not the relay
            assert sorted(arrived) == ["tun-run.avg::_Echo.rpc_parts", "tun-run.avg::_Echo.rpc_state"]
            assert target.forwarded == {}  # the node's own doors saw none of it
        finally:
            for p in (side, caller, target, relay):
                await p.p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_relay_cannot_call_in_another_members_name() -> None:
    """The target trusts the relay (the coordinator named it), yet every call the relay makes up, alters,
    replays or cuts short is refused before the handler runs; the caller's own call goes through once."""

    async def scenario() -> None:
        relay, target, caller, _ = await _three()
        try:
            handled: list[str] = []

            async def count(header: MessageHeader, packet: Packet, who: str) -> tuple[dict, Packet]:
                handled.append(who)
                return await _echo(header, packet, who)

            name = f"{RUN}.forward"
            await serve(target, name, count, TransportStats())
            target.trust_relays([relay.p2p.peer_id.to_base58()])
            me, them = caller.p2p.peer_id.to_base58(), target.p2p.peer_id
            data = runtime_pb2.ExpertRequest(metadata=encode(_header(), Packet({}))).SerializeToString()
            uid = tunnel.route_uid(me, name)

            async def via(req: tunnel.Request) -> tunnel.Response:
                return await relay.p2p.call_protobuf_handler(them, tunnel.VIA_CALL, req, tunnel.Response)

            with pytest.raises(P2PHandlerError, match="proof"):  # the relay's word alone
                await via(tunnel.Request(uid=uid, metadata=data))
            liar = Signer(_identify(relay), me, them.to_base58(), name, "ab" * 16)
            with pytest.raises(P2PHandlerError, match="another peer"):  # its own key, the caller's name
                await via(tunnel.Request(uid=uid, metadata=data, tensors=[liar.sign(data, True)]))
            honest = caller._signer(them, name)[0].sign(data, True)  # what the caller sent
            with pytest.raises(P2PHandlerError, match="changed"):
                await via(tunnel.Request(uid=uid, metadata=data + b"\x00", tensors=[honest]))
            with pytest.raises(P2PHandlerError, match="another call"):  # in a third member's name
                await via(
                    tunnel.Request(
                        uid=tunnel.route_uid(relay.p2p.peer_id.to_base58(), name), tensors=[honest]
                    )
                )
            assert handled == []
            await via(tunnel.Request(uid=uid, metadata=data, tensors=[honest]))  # forwarded as it came
            assert handled == [me]
            with pytest.raises(P2PHandlerError, match="replayed"):
                await via(tunnel.Request(uid=uid, metadata=data, tensors=[honest]))

            cut, _ = caller._signer(them, f"{name}.stream")
            head = tunnel.Request(uid=tunnel.route_uid(me, f"{name}.stream"), tensors=[cut.sign(b"", False)])
            body = tunnel.Request(metadata=data, tensors=[cut.sign(data, False)])  # and no seal after it

            async def cut_short() -> AsyncIterator[tunnel.Request]:
                yield head
                yield body

            with pytest.raises(P2PHandlerError, match="last signature"):
                async for _ in await relay.p2p.iterate_protobuf_handler(
                    them, tunnel.VIA_STREAM, cut_short(), tunnel.Response
                ):
                    pass
            assert handled == [me]  # nothing the relay made, changed, replayed or cut reached the handler
            assert target.refused == {"unproven caller": 5, "cut short": 1}
        finally:
            for p in (caller, target, relay):
                await p.p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_relay_cannot_answer_in_the_targets_name() -> None:
    """A relay that answers a forwarded call itself, unsigned or signed with its own key, or passes on
    an answer to another call, is not believed: the caller gets an error, never the forged answer."""

    async def scenario() -> None:
        relay, target, caller, _ = await _three()
        liar = Tunnel(
            await P2P.create(initial_peers=[str(m) for m in await relay.p2p.get_visible_maddrs()], **P2P_OPTS)
        )
        try:
            me = _identify(liar)
            forged = encode(
                MessageHeader.of(GradientMeta(), run=RUN, micro_batch="0:0", stage=1, step=0), Packet({})
            )
            answers: list[tunnel.Response] = []

            async def answer(req: tunnel.Request, ctx: P2PContext) -> tunnel.Response:
                return answers.pop(0)

            await liar.p2p.add_protobuf_handler(tunnel.RELAY_CALL, answer, tunnel.Request)
            caller.set_routes({target.p2p.peer_id.to_base58(): liar.p2p.peer_id.to_base58()})
            own = Signer(
                me, liar.p2p.peer_id.to_base58(), caller.p2p.peer_id.to_base58(), f"{RUN}.forward", "c" * 32
            )
            own.reply = True
            answers += [
                tunnel.Response(metadata=forged),  # no proof at all
                tunnel.Response(metadata=forged, tensors=[own.sign(forged, True)]),  # its own key
            ]
            for why in ("proof", "another call"):
                with pytest.raises(TransportError, match=why):
                    await request(
                        caller, target.p2p.peer_id, f"{RUN}.forward", _header(), Packet({}), None, 10
                    )
            assert answers == []
        finally:
            for p in (liar, caller, target, relay):
                await p.p2p.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 90))
