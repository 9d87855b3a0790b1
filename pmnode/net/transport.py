"""Data-plane transport over hivemind P2P: one request message in, one reply message out.

Mechanism: hivemind protobuf handlers carrying pmnode.net.wire bytes in the `metadata` (bytes) field of
hivemind's own `runtime_pb2.ExpertRequest/ExpertResponse`, so nothing is compiled at build time.
Each RPC name registers three handlers:

    NAME         unary, request <= UNARY_LIMIT: one call over the daemon's persistent connection
    NAME.stream  bidirectional stream: the request in CHUNK_SIZE pieces, the reply likewise
    NAME.fetch   server stream: a reply too large for a unary answer, parked under a ticket

Unary payloads are capped by the daemon (~2 MiB after protobuf framing), so the client streams any
request above UNARY_LIMIT (1.5 MiB). The client cannot know the reply's size beforehand: a unary
handler whose reply is too large parks it and answers with a ticket (a runtime_pb2.Tensor with
dtype TICKET); the client then pulls it from NAME.fetch. The handler therefore runs exactly once.

Framing overhead on top of a pmnode message (whose own framing is wire.framing_overhead, the
4-byte prefix + header JSON): protobuf adds a field tag and a length varint, 2-4 bytes per message
or chunk (counted exactly in `TransportStats.proto_*`); a hivemind stream adds 9 bytes per chunk
(marker + 8-byte length) and a 9-byte end-of-stream marker per direction. libp2p (yamux, TLS) adds
its own, below what this module can see.

A request that fails to decode, or whose handler raises, gets a kind="error" reply with the
reason in meta["reason"] and is counted in `TransportStats.errors`; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net import tunnel
from pmnode.net.shaping import LinkShaper
from pmnode.net.wire import MessageHeader, WireError, WireLimits, decode, encode, framing_overhead

UNARY_LIMIT = 1536 * 1024  # leaves headroom under the daemon's ~2 MiB unary cap for protobuf framing
CHUNK_SIZE = 2**20
TICKET = "pmnode.ticket"
TICKET_TTL = 60.0  # seconds a parked reply waits for its fetch before it is dropped

Reply = tuple[MessageHeader | Mapping[str, Any], Packet]
Handler = Callable[[MessageHeader, Packet, str], Awaitable[Reply]]


class Gate(Protocol):
    """Admission before a byte is decoded (see pmnode.auth.Guard)."""

    def admit(self, caller: str) -> str | None: ...  # None, or why the caller is refused
    def strike(self, caller: str) -> bool: ...  # the caller sent something bad


class TransportError(PmnodeError):
    """A call that got no usable reply: timeout, daemon or stream failure, or an error reply."""


class Refused(TransportError):
    """The peer answered with an error reply; `reason` is its first phrase, e.g. 'unauthorized'."""

    def __init__(self, rpc: str, reason: str):
        super().__init__(f"peer refused {rpc}: {reason}")
        self.reason = reason.split(":", 1)[0]


def _key(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # stats are keyed by the short name: 'forward', 'backward'


@dataclass
class TransportStats:
    """Counters per short RPC name, from this process's side: `*_sent` left it, `*_received` came in.

    bytes_* are exactly len() of pmnode messages; payload_* their tensor bytes alone; proto_* the
    serialized protobuf sizes that carried them. Pass separate instances to `serve` and `call` to
    tell the server's role from the client's.
    """

    messages_sent: Counter[str] = field(default_factory=Counter)
    messages_received: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    bytes_received: Counter[str] = field(default_factory=Counter)
    payload_sent: Counter[str] = field(default_factory=Counter)
    payload_received: Counter[str] = field(default_factory=Counter)
    proto_bytes_sent: Counter[str] = field(default_factory=Counter)
    proto_bytes_received: Counter[str] = field(default_factory=Counter)
    streamed: Counter[str] = field(default_factory=Counter)  # messages that went in chunks
    errors: Counter[str] = field(default_factory=Counter)
    error_reasons: Counter[str] = field(default_factory=Counter)

    def count(self, key: str, data: bytes, sent: bool) -> None:
        try:
            payload = len(data) - framing_overhead(data)
        except WireError:
            payload = 0
        d = "sent" if sent else "received"
        getattr(self, f"messages_{d}")[key] += 1
        getattr(self, f"bytes_{d}")[key] += len(data)
        getattr(self, f"payload_{d}")[key] += max(payload, 0)

    def error(self, key: str, reason: str) -> None:
        self.errors[key] += 1
        self.error_reasons[reason] += 1

    def summary(self) -> dict[str, int]:
        return {
            "messages_sent": sum(self.messages_sent.values()),
            "messages_received": sum(self.messages_received.values()),
            "bytes_sent": sum(self.bytes_sent.values()),
            "bytes_received": sum(self.bytes_received.values()),
            "errors": sum(self.errors.values()),
        }


def error_message(reason: str, request: MessageHeader | None = None, sender: str = "") -> bytes:
    """A kind='error' reply with meta['reason'], addressed like the request when it could be parsed."""
    where = request.model_dump(include={"run", "micro_batch", "stage", "step"}) if request else {}
    fields = {"run": "", "micro_batch": "", "stage": 0, "step": 0, "sender": sender, **where}
    return encode({**fields, "kind": "error", "meta": {"reason": reason[:300]}}, Packet({}))


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]


class _Server:
    """One RPC's three handlers (unary, .stream, .fetch) around one message handler; see `serve`."""

    def __init__(
        self,
        me: str,
        name: str,
        handler: Handler,
        stats: TransportStats,
        limits: WireLimits,
        shaper: LinkShaper | None,
        guard: Gate | None,
    ):
        self.me, self.key, self.handler, self.stats = me, _key(name), handler, stats
        self.limits, self.shaper, self.guard = limits, shaper, guard
        self.parked: dict[str, tuple[float, bytes]] = {}  # ticket -> (deadline, reply too large for unary)

    def refuse(self, caller: str) -> bytes | None:
        reason = self.guard.admit(caller) if self.guard is not None else None
        if reason is None:
            return None
        self.stats.error(self.key, reason)
        return error_message(reason, sender=self.me)

    async def _answer(self, data: bytes, caller: str) -> bytes:
        header = None
        try:
            refused = self.refuse(caller)
            if refused is not None:
                return refused
            header, packet = decode(data, self.limits)
            reply_header, reply = await self.handler(header, packet, caller)
            if not isinstance(reply_header, MessageHeader):
                base = header.model_dump(include={"run", "micro_batch", "stage", "step"})
                reply_header = {**base, "sender": self.me, **reply_header}
            return encode(reply_header, reply)
        except WireError as e:
            self.stats.error(self.key, e.reason)
            if self.guard is not None:
                self.guard.strike(caller)
            return error_message(str(e), header, self.me)
        except Exception as e:  # the handler's bug or refusal must not take the server down
            self.stats.error(self.key, f"handler: {type(e).__name__}")
            return error_message(f"{type(e).__name__}: {e}", header, self.me)

    async def process(self, data: bytes, caller: str) -> bytes:
        self.stats.count(self.key, data, sent=False)
        out = await self._answer(data, caller)
        self.stats.count(self.key, out, sent=True)
        if self.shaper is not None:
            await self.shaper.transmit(caller, len(out))
        return out

    async def unary(self, req: runtime_pb2.ExpertRequest, ctx: P2PContext) -> runtime_pb2.ExpertResponse:
        self.stats.proto_bytes_received[self.key] += req.ByteSize()
        out = await self.process(req.metadata, ctx.remote_id.to_base58())
        if len(out) <= UNARY_LIMIT:
            resp = runtime_pb2.ExpertResponse(metadata=out)
        else:
            now = time.monotonic()
            for t in [t for t, (deadline, _) in self.parked.items() if deadline < now]:
                del self.parked[t]  # the client died or gave up before fetching
            ticket = secrets.token_hex(16)
            self.parked[ticket] = (now + TICKET_TTL, out)
            resp = runtime_pb2.ExpertResponse(
                tensors=[runtime_pb2.Tensor(buffer=ticket.encode(), dtype=TICKET)]
            )
        self.stats.proto_bytes_sent[self.key] += resp.ByteSize()
        return resp

    def replies(self, out: bytes) -> list[runtime_pb2.ExpertResponse]:
        self.stats.streamed[self.key] += 1
        resps = [runtime_pb2.ExpertResponse(metadata=part) for part in _chunks(out)]
        self.stats.proto_bytes_sent[self.key] += sum(r.ByteSize() for r in resps)
        return resps

    async def stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        caller = ctx.remote_id.to_base58()
        out = self.refuse(caller)  # if refused, don't even read the upload
        if out is None:
            out = await self._upload(requests, caller)
        for resp in self.replies(out):
            yield resp

    async def _upload(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str) -> bytes:
        parts, size = [], 0
        async for req in requests:
            self.stats.proto_bytes_received[self.key] += req.ByteSize()
            parts.append(req.metadata)
            size += len(req.metadata)
            if size > self.limits.max_bytes:  # stop buffering at once: the sender may be hostile
                self.stats.error(self.key, "too large")
                if self.guard is not None:
                    self.guard.strike(caller)
                return error_message(
                    f"too large: stream exceeds {self.limits.max_bytes} bytes", sender=self.me
                )
        return await self.process(b"".join(parts), caller)

    async def fetch(
        self, req: runtime_pb2.ExpertRequest, ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        _, out = self.parked.pop(req.uid, (0.0, b""))
        if not out:
            self.stats.error(self.key, "unknown ticket")
            out = error_message("unknown ticket: the reply expired or was fetched already", sender=self.me)
        for resp in self.replies(out):
            yield resp


async def serve(
    p2p: P2P,
    name: str,
    handler: Handler,
    stats: TransportStats,
    limits: WireLimits | None = None,
    shaper: LinkShaper | None = None,
    guard: Gate | None = None,
) -> None:
    """Register one RPC `name` (unary, .stream, .fetch) answering with `handler`.

    With a `guard`, a caller it refuses gets an error reply before anything is decoded, and every
    message that fails decoding or the handler's checks (a WireError) is a strike against its sender.

    With a `shaper`, each reply waits for its emulated trip over the link back to the caller.

    A dict reply header is completed from the request (run, micro_batch, stage, step) and this
    peer's id as sender, so handlers need to give only what changes, e.g. {"kind": "gradient"}.
    """
    srv = _Server(p2p.peer_id.to_base58(), name, handler, stats, limits or WireLimits(), shaper, guard)
    await tunnel.add_handler(p2p, name, srv.unary)
    await tunnel.add_handler(p2p, f"{name}.stream", srv.stream, stream_input=True, stream_output=True)
    await tunnel.add_handler(p2p, f"{name}.fetch", srv.fetch, stream_output=True)


async def _pull(
    p2p: P2P,
    peer: PeerID,
    name: str,
    requests: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest],
    stats: TransportStats,
) -> bytes:
    key, parts = _key(name.rsplit(".", 1)[0]), []  # strip .stream / .fetch
    stats.streamed[key] += 1
    async for resp in await tunnel.stream(p2p, peer, name, requests):
        stats.proto_bytes_received[key] += resp.ByteSize()
        parts.append(resp.metadata)
    return b"".join(parts)


async def _exchange(p2p: P2P, peer: PeerID, name: str, data: bytes, stats: TransportStats) -> bytes:
    key = _key(name)
    if len(data) <= UNARY_LIMIT:
        req = runtime_pb2.ExpertRequest(metadata=data)
        stats.proto_bytes_sent[key] += req.ByteSize()
        resp = await tunnel.unary(p2p, peer, name, req)
        stats.proto_bytes_received[key] += resp.ByteSize()
        if not (resp.tensors and resp.tensors[0].dtype == TICKET):
            return resp.metadata
        ticket = runtime_pb2.ExpertRequest(uid=resp.tensors[0].buffer.decode())
        stats.proto_bytes_sent[key] += ticket.ByteSize()
        return await _pull(p2p, peer, f"{name}.fetch", ticket, stats)

    async def chunks() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for part in _chunks(data):
            req = runtime_pb2.ExpertRequest(metadata=part)
            stats.proto_bytes_sent[key] += req.ByteSize()
            yield req

    return await _pull(p2p, peer, f"{name}.stream", chunks(), stats)


async def call(
    p2p: P2P,
    peer_id: str | PeerID,
    rpc: str,
    data: bytes,
    timeout: float,
    stats: TransportStats | None = None,
    shaper: LinkShaper | None = None,
) -> bytes:
    """Send one encoded message to `rpc` (a full handler name) at `peer_id`; return the reply's bytes.

    Unary up to UNARY_LIMIT, streamed above. The reply is not decoded here (see `request`).
    With a `shaper`, the request first waits for its emulated trip over the link to the peer.
    """
    stats = stats if stats is not None else TransportStats()
    key = _key(rpc)
    peer = peer_id if isinstance(peer_id, PeerID) else PeerID.from_base58(peer_id)
    stats.count(key, data, sent=True)

    async def shaped() -> bytes:
        if shaper is not None:
            await shaper.transmit(peer.to_base58(), len(data))
        return await _exchange(p2p, peer, rpc, data, stats)

    try:
        reply = await asyncio.wait_for(shaped(), timeout)
    except asyncio.TimeoutError:
        stats.error(key, "timeout")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} timed out after {timeout:g} s") from None
    except (P2PDaemonError, P2PHandlerError, OSError, EOFError) as e:  # IncompleteReadError is an EOFError
        stats.error(key, f"transport: {type(e).__name__}")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} failed: {e}") from e
    if not reply:  # a stream the server closed without answering, e.g. after cutting off our upload
        stats.error(key, "transport: empty reply")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} hung up without a reply")
    stats.count(key, reply, sent=False)
    return reply


async def request(
    p2p: P2P,
    peer_id: str | PeerID,
    rpc: str,
    header: MessageHeader | Mapping[str, Any],
    packet: Packet,
    stats: TransportStats | None,
    timeout: float,
    limits: WireLimits | None = None,
    shaper: LinkShaper | None = None,
) -> tuple[MessageHeader, Packet]:
    """encode + call + decode; an error reply raises TransportError carrying the peer's reason."""
    stats = stats if stats is not None else TransportStats()
    data = await call(p2p, peer_id, rpc, encode(header, packet), timeout, stats, shaper)
    try:
        reply_header, reply = decode(data, limits)
    except WireError as e:
        stats.error(_key(rpc), e.reason)
        raise
    if reply_header.kind == "error":
        raise Refused(rpc, str(reply_header.meta.get("reason", "?")))
    return reply_header, reply
