"""The serving side of pmnode.net.transport: one RPC's unary, .stream and .fetch handlers.

A caller the `Gate` refuses gets an error reply before a byte is decoded; a request that fails to
decode, or whose handler raises, gets a kind="error" reply and is counted, and the server keeps
serving. A reply too large for a unary answer is parked under a ticket for the caller to fetch.

A request's decode and the RPC's own check of it are one job of the server's `run`, and the reply's
encode another (pmnode.net.jobs): the event loop only moves bytes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from pmnode.core.codecs import Packet
from pmnode.net import tunnel
from pmnode.net.jobs import Check, Run, off_loop
from pmnode.net.shaping import LinkShaper
from pmnode.net.transport import (
    TICKET,
    TICKET_TTL,
    UNARY_LIMIT,
    TransportStats,
    chunks,
    error_message,
    rpc_key,
)
from pmnode.net.wire import MessageHeader, WireError, WireLimits, decode, encode

MAX_PARKED = 32  # large replies waiting for their fetch at once, per RPC; the oldest goes beyond
Reply = tuple[MessageHeader, Packet]
Handler = Callable[[MessageHeader, Packet, str], Awaitable[Reply]]


class Gate(Protocol):
    """Admission before a byte is decoded (see pmnode.auth.Guard)."""

    def admit(self, caller: str) -> str | None: ...  # None, or why the caller is refused
    def strike(self, caller: str) -> bool: ...  # the caller sent something bad


def _decode_request(
    data: bytes, limits: WireLimits, check: Check | None
) -> tuple[MessageHeader, Packet, Exception | None]:
    """A job: decode a request and run the RPC's check on it, whatever its kind. What the check raises
    comes back beside the header, so that the error reply is addressed like the request."""
    header, packet = decode(data, limits, finite=check is None)  # the check scans for NaN/Inf itself
    try:
        if check is not None:
            check(header, packet)
    except Exception as e:  # raised again on the loop, where the error reply is made
        return header, packet, e
    return header, packet, None


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
        run: Run = off_loop,
        check: Check | None = None,
    ):
        self.me, self.key, self.handler, self.stats = me, rpc_key(name), handler, stats
        self.limits, self.shaper, self.guard, self.run, self.check = limits, shaper, guard, run, check
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
            header, packet, failed = await self.run(_decode_request, data, self.limits, self.check)
            if failed is not None:
                raise failed
            reply_header, reply = await self.handler(header, packet, caller)
            return await self.run(encode, reply_header, reply)
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
            while len(self.parked) >= MAX_PARKED:  # callers that never fetch cannot pile replies up
                del self.parked[next(iter(self.parked))]
            ticket = secrets.token_hex(16)
            self.parked[ticket] = (now + TICKET_TTL, out)
            resp = runtime_pb2.ExpertResponse(
                tensors=[runtime_pb2.Tensor(buffer=ticket.encode(), dtype=TICKET)]
            )
        self.stats.proto_bytes_sent[self.key] += resp.ByteSize()
        return resp

    def replies(self, out: bytes) -> list[runtime_pb2.ExpertResponse]:
        self.stats.streamed[self.key] += 1
        resps = [runtime_pb2.ExpertResponse(metadata=part) for part in chunks(out)]
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
    tun: tunnel.Tunnel,
    name: str,
    handler: Handler,
    stats: TransportStats,
    limits: WireLimits | None = None,
    shaper: LinkShaper | None = None,
    guard: Gate | None = None,
    *,
    run: Run = off_loop,
    check: Check | None = None,
) -> None:
    """Register one RPC `name` (unary, .stream, .fetch) answering with `handler`.

    Each request is decoded, and `check`ed, in one job of `run`, and each reply encoded in another
    (pmnode.net.jobs); the handler gets the request only if the check passed. A check must refuse
    NaN and Inf (net.checks.check_magnitude does), since the decode then does not scan for them.

    With a `guard`, a caller it refuses gets an error reply before anything is decoded, and every
    message that fails decoding or the handler's checks (a WireError) is a strike against its sender.

    With a `shaper`, each reply waits for its emulated trip over the link back to the caller.
    """
    me, limits = tun.p2p.peer_id.to_base58(), limits or WireLimits()
    srv = _Server(me, name, handler, stats, limits, shaper, guard, run, check)
    await tun.add_handler(name, srv.unary)
    await tun.add_handler(f"{name}.stream", srv.stream, stream_input=True, stream_output=True)
    await tun.add_handler(f"{name}.fetch", srv.fetch, stream_output=True)
