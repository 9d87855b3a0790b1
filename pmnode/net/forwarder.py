"""The relay's side of net.tunnel: forward certified members' calls to members behind NAT.

Served by the coordinator (unless --no-relay) and by members started with `--relay`. A member shows
its certificate once (RELAY_HELLO, again after each renewal); from then on the relay forwards its
calls to any other member that did the same: the member behind NAT says hello at join and at every
heartbeat, which also keeps its connection to the relay open. An outsider, or a member whose
certificate expired, is refused and counted; nothing it sends is forwarded.

The relay buffers nothing beyond one protobuf message at a time: a stream is passed on message by
message. `RelayCounters` says what it carried, per target, for /metrics and the benchmark.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hivemind.p2p import P2PContext, PeerID

from pmnode.net.auth import AuthError, Cert, Verifier
from pmnode.net.control import Ack, Hello, add_json_handler
from pmnode.net.tunnel import (
    RELAY_CALL,
    RELAY_HELLO,
    RELAY_STREAM,
    Request,
    Response,
    Tunnel,
    TunnelError,
    parse_uid,
    route_uid,
    via_names,
)

MAX_MEMBERS = 4096  # certificates held at once; the oldest-expiring go first beyond it


@dataclass
class RelayCounters:
    """What the relay forwarded (bytes of protobuf messages, each way) and what it refused."""

    calls: Counter[str] = field(default_factory=Counter)  # target peer id -> forwarded calls
    bytes_in: Counter[str] = field(default_factory=Counter)  # target -> bytes from callers to it
    bytes_out: Counter[str] = field(default_factory=Counter)  # target -> bytes of its replies
    failed: Counter[str] = field(default_factory=Counter)  # target -> calls it did not answer
    refused: Counter[str] = field(default_factory=Counter)  # reason -> calls not forwarded

    def total(self) -> dict[str, int]:
        return {
            "calls": sum(self.calls.values()),
            "bytes_in": sum(self.bytes_in.values()),
            "bytes_out": sum(self.bytes_out.values()),
            "failed": sum(self.failed.values()),
            "refused": sum(self.refused.values()),
        }


class Forwarder:
    def __init__(self, tun: Tunnel, verifier: Verifier):
        self.tunnel, self.p2p, self.verifier = tun, tun.p2p, verifier
        self.members: dict[str, Cert] = {}
        self.counters = RelayCounters()

    async def serve(self) -> None:
        await add_json_handler(self.tunnel, RELAY_HELLO, Hello, self.hello)
        await self.p2p.add_protobuf_handler(RELAY_CALL, self.call, Request)
        await self.p2p.add_protobuf_handler(
            RELAY_STREAM, self.stream, Request, stream_input=True, stream_output=True
        )

    async def hello(self, req: Hello, caller: str) -> Ack:
        try:
            self.verifier.check_cert(req.cert, peer_id=caller)
        except AuthError as e:
            self.counters.refused[e.reason] += 1
            raise
        if len(self.members) >= MAX_MEMBERS and caller not in self.members:
            oldest = min(self.members, key=lambda p: self.members[p].expires)
            del self.members[oldest]
        self.members[caller] = req.cert
        return Ack()

    def _member(self, peer: str) -> bool:
        cert = self.members.get(peer)
        return cert is not None and cert.expires > time.time()

    def _route(self, uid: str, ctx: P2PContext) -> tuple[PeerID, str, str]:
        """(target, handler, onward uid) of a call from a certified member to another; else refused."""
        caller = ctx.remote_id.to_base58()
        try:
            target, name = parse_uid(uid)
        except TunnelError:
            self.counters.refused["malformed route"] += 1
            raise
        if not self._member(caller):
            self.counters.refused["caller not a member"] += 1
            raise TunnelError("unauthorized: say hello to the relay with a valid certificate first")
        if not self._member(target.to_base58()):
            self.counters.refused["target not a member"] += 1
            raise TunnelError("the target has no valid certificate at this relay")
        return target, name, route_uid(caller, name)

    async def call(self, req: Request, ctx: P2PContext) -> Response:
        target, name, onward = self._route(req.uid, ctx)
        key, c = target.to_base58(), self.counters
        c.calls[key] += 1
        c.bytes_in[key] += len(req.metadata)
        try:
            onward_req = Request(uid=onward, metadata=req.metadata, tensors=req.tensors)  # proof included
            resp = await self.p2p.call_protobuf_handler(target, via_names(name)[0], onward_req, Response)
        except Exception:
            c.failed[key] += 1
            raise
        c.bytes_out[key] += resp.ByteSize()
        return resp

    async def stream(self, requests: AsyncIterator[Request], ctx: P2PContext) -> AsyncIterator[Response]:
        head = await anext(requests)
        target, name, onward = self._route(head.uid, ctx)
        key, c = target.to_base58(), self.counters
        c.calls[key] += 1

        async def passed_on() -> AsyncIterator[Request]:
            yield Request(uid=onward, tensors=head.tensors)  # the caller's proof goes on untouched
            async for r in requests:
                c.bytes_in[key] += r.ByteSize()
                yield r

        try:
            async for resp in await self.p2p.iterate_protobuf_handler(
                target, via_names(name)[1], passed_on(), Response
            ):
                c.bytes_out[key] += resp.ByteSize()
                yield resp
        except Exception:
            c.failed[key] += 1
            raise
