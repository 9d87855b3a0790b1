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

This module is the client (`call`, `request`) and what both sides share; pmnode.net.serving registers
the handlers. A request that fails to decode, or whose handler raises, gets a kind="error" reply with
the reason in its ErrorMeta and is counted in `TransportStats.errors`; the server keeps serving.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net import tunnel
from pmnode.net.jobs import Check, Run, off_loop
from pmnode.net.meta import ErrorMeta
from pmnode.net.shaping import LinkShaper
from pmnode.net.wire import MessageHeader, WireError, WireLimits, decode, encode, framing_overhead

UNARY_LIMIT = 1536 * 1024  # leaves headroom under the daemon's ~2 MiB unary cap for protobuf framing
CHUNK_SIZE = 2**20
TICKET = "pmnode.ticket"
TICKET_TTL = 60.0  # seconds a parked reply waits for its fetch before it is dropped
MAX_REPLY = WireLimits().max_bytes  # bytes a streamed reply may add up to; the peer chooses how many


class ReplyTooLarge(EOFError):
    """A streamed reply went past the caller's limit: the rest is not read (an EOFError, as a cut)."""


class TransportError(PmnodeError):
    """A call that got no usable reply: timeout, daemon or stream failure, or an error reply."""


class Refused(TransportError):
    """The peer answered with an error reply; `reason` is its first phrase, e.g. 'unauthorized'."""

    def __init__(self, rpc: str, reason: str):
        super().__init__(f"peer refused {rpc}: {reason}")
        self.reason = reason.split(":", 1)[0]


def rpc_key(name: str) -> str:
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
    """A kind='error' reply with its reason, addressed like the request when it could be parsed."""
    meta = ErrorMeta(reason=reason[:300])
    r = request
    header = MessageHeader.of(
        meta,
        run=r.run if r else "",
        micro_batch=r.micro_batch if r else "",
        stage=r.stage if r else 0,
        step=r.step if r else 0,
        sender=sender,
    )
    return encode(header, Packet({}))


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]


async def _pull(
    tun: tunnel.Tunnel,
    peer: PeerID,
    name: str,
    requests: runtime_pb2.ExpertRequest | AsyncIterator[runtime_pb2.ExpertRequest],
    stats: TransportStats,
    limit: int = MAX_REPLY,
) -> bytes:
    key, parts, size = rpc_key(name.rsplit(".", 1)[0]), [], 0  # strip .stream / .fetch
    stats.streamed[key] += 1
    resp: runtime_pb2.ExpertResponse
    async for resp in await tun.stream(peer, name, requests):
        stats.proto_bytes_received[key] += resp.ByteSize()
        size += len(resp.metadata)
        if size > limit:  # stop buffering at once: the peer may be hostile
            raise ReplyTooLarge(f"the reply exceeds {limit} bytes")
        parts.append(resp.metadata)
    return b"".join(parts)


async def _exchange(
    tun: tunnel.Tunnel, peer: PeerID, name: str, data: bytes, stats: TransportStats, limit: int = MAX_REPLY
) -> bytes:
    key = rpc_key(name)
    if len(data) <= UNARY_LIMIT:
        req = runtime_pb2.ExpertRequest(metadata=data)
        stats.proto_bytes_sent[key] += req.ByteSize()
        resp: runtime_pb2.ExpertResponse = await tun.unary(peer, name, req)
        stats.proto_bytes_received[key] += resp.ByteSize()
        if not (resp.tensors and resp.tensors[0].dtype == TICKET):
            reply: bytes = resp.metadata  # protobuf's fields are untyped
            return reply
        ticket = runtime_pb2.ExpertRequest(uid=resp.tensors[0].buffer.decode())
        stats.proto_bytes_sent[key] += ticket.ByteSize()
        return await _pull(tun, peer, f"{name}.fetch", ticket, stats, limit)

    async def upload() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for part in chunks(data):
            req = runtime_pb2.ExpertRequest(metadata=part)
            stats.proto_bytes_sent[key] += req.ByteSize()
            yield req

    return await _pull(tun, peer, f"{name}.stream", upload(), stats, limit)


async def call(
    tun: tunnel.Tunnel,
    peer_id: str | PeerID,
    rpc: str,
    data: bytes,
    timeout: float,
    stats: TransportStats | None = None,
    shaper: LinkShaper | None = None,
    max_reply: int = MAX_REPLY,
) -> bytes:
    """Send one encoded message to `rpc` (a full handler name) at `peer_id`; return the reply's bytes.

    Unary up to UNARY_LIMIT, streamed above. The reply is not decoded here (see `request`); a streamed
    one is read up to `max_reply` bytes, no further.
    With a `shaper`, the request first waits for its emulated trip over the link to the peer.
    """
    stats = stats if stats is not None else TransportStats()
    key = rpc_key(rpc)
    peer = peer_id if isinstance(peer_id, PeerID) else PeerID.from_base58(peer_id)
    stats.count(key, data, sent=True)

    async def shaped() -> bytes:
        if shaper is not None:
            await shaper.transmit(peer.to_base58(), len(data))
        return await _exchange(tun, peer, rpc, data, stats, max_reply)

    try:
        reply = await asyncio.wait_for(shaped(), timeout)
    except asyncio.TimeoutError:
        stats.error(key, "timeout")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} timed out after {timeout:g} s") from None
    except (P2PDaemonError, P2PHandlerError, OSError, EOFError, tunnel.TunnelError) as e:  # EOFError: cut off
        stats.error(key, f"transport: {type(e).__name__}")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} failed: {e}") from e
    if not reply:  # a stream the server closed without answering, e.g. after cutting off our upload
        stats.error(key, "transport: empty reply")
        raise TransportError(f"{rpc} to {peer.to_base58()[-8:]} hung up without a reply")
    stats.count(key, reply, sent=False)
    return reply


def _decode_reply(
    data: bytes, limits: WireLimits | None, check: Check | None
) -> tuple[MessageHeader, Packet]:
    """A job: decode a reply and, unless it is an error reply, run the caller's check on it."""
    header, packet = decode(data, limits, finite=check is None)  # the check scans for NaN/Inf itself
    if check is not None and header.kind != "error":
        check(header, packet)
    return header, packet


async def request(
    tun: tunnel.Tunnel,
    peer_id: str | PeerID,
    rpc: str,
    header: MessageHeader,
    packet: Packet,
    stats: TransportStats | None,
    timeout: float,
    limits: WireLimits | None = None,
    shaper: LinkShaper | None = None,
    *,
    run: Run = off_loop,
    check: Check | None = None,
) -> tuple[MessageHeader, Packet]:
    """encode + call + decode; an error reply raises TransportError carrying the peer's reason.

    The encode is one job of `run` and the reply's decode another, with `check` in it: a check must
    refuse NaN and Inf (net.checks.check_magnitude does), since the decode then does not scan for them.
    A reply that fails either is a WireError, counted under its reason.
    """
    stats = stats if stats is not None else TransportStats()
    max_reply = (limits or WireLimits()).max_bytes
    data = await call(tun, peer_id, rpc, await run(encode, header, packet), timeout, stats, shaper, max_reply)
    try:
        reply_header, reply = await run(_decode_reply, data, limits, check)
    except WireError as e:
        stats.error(rpc_key(rpc), e.reason)
        raise
    if isinstance(reply_header.meta, ErrorMeta):
        raise Refused(rpc, reply_header.meta.reason)
    return reply_header, reply
