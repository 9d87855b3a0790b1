"""Calls to a member behind NAT, forwarded by a relay over the connection that member opened to it.

hivemind 1.1.12's p2pd resets every relayed circuit after ~128 KiB each way (net.relay), so two
members that are both behind NAT cannot exchange training traffic through a circuit. Instead a
reachable relay (the coordinator, or a member with `--relay`: net.forwarder) forwards pmnode's own
RPCs at the application level (caller --RELAY_CALL / RELAY_STREAM--> relay --VIA_CALL / VIA_STREAM-->
member behind NAT), over the plain connection the member keeps to it, so nothing is capped. A
forwarded message names its target and handler in the wrapper's `uid`; the relay replaces the target
with the (libp2p-authenticated) caller. The relay's word is not enough: the caller signs every
message of the call with its own key and sends its certificate along (net.callproof), and the member
checks both against the run's authority before it runs its own handler as if that caller had called
it (the same guard, the same certificates); its answer comes back signed likewise. A member accepts
forwarded calls only from the relays the coordinator named to it at join (the coordinator itself and
the members its operator named, never a member's own say-so).

Every pmnode handler registers here (`add_handler`) so a forwarded call finds it, and every pmnode
call goes out through `unary`/`stream`, which take the route set by `set_routes`. Any protobuf
service can use it: a forwarded message carries the caller's message serialized in an ExpertRequest
(and the reply likewise), and a handler named `NAMESPACE::...` (hivemind's servicers) is reached
through doors of its own namespace, so a servicer in another process on the same daemon (hivemind's
averager) keeps its own. `Routed` gives hivemind's stubs the same routes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from pmnode.net import bounded
from pmnode.net.auth import AuthError, Verifier
from pmnode.net.callproof import Checker, Identity, ReplyCheck, Session, Signer, open_call

# Every pmnode process serves and calls through here: its streams read no message above
# bounded.MAX_MESSAGE, whoever sends it (the doors below included), before any handler runs.
bounded.install()

RELAY_HELLO = "pmnode.relay.hello"  # fixed names: the relay may be the coordinator, which has no run prefix
RELAY_CALL = "pmnode.relay.call"
RELAY_STREAM = "pmnode.relay.stream"
VIA_CALL = "pmnode.via.call"
VIA_STREAM = "pmnode.via.stream"

# Generated protobuf classes: mypy reads them as Any (pyproject.toml, hivemind.proto.*).
Request: TypeAlias = runtime_pb2.ExpertRequest
Response: TypeAlias = runtime_pb2.ExpertResponse
Fn = Callable[[Any, P2PContext], Any]
M = TypeVar("M", bound=Message)


class TunnelError(Exception):
    """A forwarded call that cannot be delivered: unknown handler, untrusted relay, malformed route."""


@dataclass
class _Local:
    fn: Fn
    input_type: type[Message]
    stream_input: bool
    stream_output: bool


@dataclass
class Table:
    """One P2P's side of the tunnel: its handlers, whom it reaches through which relay, whom it trusts."""

    handlers: dict[str, _Local] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # target peer id -> relay peer id
    relays: set[str] = field(default_factory=set)  # relays that may forward calls to us
    forwarded: Counter[str] = field(default_factory=Counter)  # handler -> calls that came through a relay
    refused: Counter[str] = field(default_factory=Counter)  # reason -> forwarded calls refused
    doors: set[str] = field(default_factory=set)  # namespaces whose VIA_* handlers are registered
    on_arrival: Callable[[str], None] | None = None  # told each forwarded call's handler name
    identity: Identity | None = None  # signs the calls this side sends through a relay
    checker: Checker | None = None  # checks the callers' proofs on forwarded calls; none: refuse them


_TABLE_ATTR = "_pmnode_tunnel_table"


def table(p2p: P2P) -> Table:
    """The tunnel table of this P2P, kept on the P2P object itself (made on first use): it lives and dies
    with the transport it routes, each P2P has its own (the node's, its averager process's), and this
    module keeps no state."""
    t: Table | None = getattr(p2p, _TABLE_ATTR, None)
    if t is None:
        t = Table()
        setattr(p2p, _TABLE_ATTR, t)
    return t


def via_names(name: str) -> tuple[str, str]:
    """The (unary, stream) doors through which handler `name` is reached when forwarded."""
    space, sep, _ = name.rpartition("::")
    return (VIA_CALL, VIA_STREAM) if not sep else (f"{space}::{VIA_CALL}", f"{space}::{VIA_STREAM}")


def route_uid(peer: str, name: str) -> str:
    return f"{peer} {name}"


def parse_uid(uid: str) -> tuple[PeerID, str]:
    """(peer, handler name) of a forwarded call's uid; TunnelError if it is not one."""
    peer, _, name = uid.partition(" ")
    if not name or len(uid) > 512:
        raise TunnelError("malformed route")
    try:
        return PeerID.from_base58(peer), name
    except Exception as e:
        raise TunnelError("malformed route") from e


# ---- serving: every handler is reachable directly and through a relay ----------------------------------
async def add_handler(
    p2p: P2P,
    name: str,
    fn: Fn,
    *,
    input_type: type[Message] = Request,
    stream_input: bool = False,
    stream_output: bool = False,
    registered: bool = False,
) -> None:
    """p2p.add_protobuf_handler (unless `registered` already), also reachable through the VIA doors."""
    if not registered:
        await p2p.add_protobuf_handler(
            name, fn, input_type, stream_input=stream_input, stream_output=stream_output
        )
    t = table(p2p)
    call_door, stream_door = via_names(name)
    if call_door not in t.doors:  # the first handler of a namespace brings its doors
        t.doors.add(call_door)
        await p2p.add_protobuf_handler(call_door, _via_call(p2p), Request)
        await p2p.add_protobuf_handler(
            stream_door, _via_stream(p2p), Request, stream_input=True, stream_output=True
        )
    t.handlers[name] = _Local(fn, input_type, stream_input, stream_output)


def set_identity(p2p: P2P, identity: Identity, verifier: Verifier) -> None:
    """Sign forwarded calls with `identity`; check the callers of calls forwarded to us with `verifier`."""
    t = table(p2p)
    t.identity, t.checker = identity, Checker(verifier, p2p.peer_id.to_base58())


def trust_relays(p2p: P2P, relays: Iterable[str]) -> None:
    """Accept forwarded calls from these relays (multiaddrs ending in /p2p/ID, or bare peer ids)."""
    table(p2p).relays = {r.rsplit("/p2p/", 1)[-1] for r in relays}


def _arrival(p2p: P2P, req: Request, ctx: P2PContext) -> tuple[_Local, P2PContext, Session]:
    t = table(p2p)
    if ctx.remote_id.to_base58() not in t.relays:
        t.refused["not our relay"] += 1
        raise TunnelError("forwarded by a peer that is not this node's relay")
    caller, name = parse_uid(req.uid)
    local = t.handlers.get(name)
    if local is None:
        t.refused["unknown handler"] += 1
        raise TunnelError(f"no handler {name!r}")
    if t.checker is None:
        t.refused["no authority"] += 1
        raise TunnelError("this node cannot check callers yet")
    try:  # the caller's own proof, not the relay's word
        session = t.checker.first(list(req.tensors), req.metadata, caller.to_base58(), name)
    except AuthError as e:
        t.refused["unproven caller"] += 1
        raise TunnelError(str(e)) from e
    t.forwarded[name] += 1
    if t.on_arrival is not None:
        t.on_arrival(name)
    return local, P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=caller), session


def _identity(p2p: P2P) -> Identity:
    identity = table(p2p).identity
    if identity is None:  # set_identity sets it with the checker, before any forwarded call is let in
        raise TunnelError("this node has no identity to sign its answers with yet")
    return identity


def _wrap(msg: Message | None, replier: Signer, end: bool = False) -> Response:
    """An answer to a forwarded call, signed by this node: the relay cannot answer in its name."""
    data = b"" if msg is None else msg.SerializeToString()
    return Response(metadata=data, tensors=[replier.sign(data, end)])


def _via_call(p2p: P2P) -> Callable[[Request, P2PContext], Awaitable[Response]]:
    async def handle(req: Request, ctx: P2PContext) -> Response:
        local, inner, session = _arrival(p2p, req, ctx)
        if local.stream_input or local.stream_output or not session.ended:
            raise TunnelError(f"{inner.handle_name} is a stream handler")
        out = await local.fn(local.input_type.FromString(req.metadata), inner)
        return _wrap(out, session.replier(_identity(p2p)), end=True)

    return handle


def _via_stream(p2p: P2P) -> Callable[[AsyncIterator[Request], P2PContext], AsyncIterator[Response]]:
    async def handle(requests: AsyncIterator[Request], ctx: P2PContext) -> AsyncIterator[Response]:
        head = await anext(requests)
        local, inner, session = _arrival(p2p, head, ctx)
        t = table(p2p)

        async def unwrapped() -> AsyncIterator[Message]:
            async for r in requests:
                try:  # each message the next one its caller signed, checked before the handler sees it
                    session.next(list(r.tensors), r.metadata)
                except AuthError as e:
                    t.refused["unproven caller"] += 1
                    raise TunnelError(str(e)) from e
                if session.ended:  # the caller's seal: the call is whole
                    return
                yield local.input_type.FromString(r.metadata)
            t.refused["cut short"] += 1
            raise TunnelError("the call ended without its caller's last signature")

        items, replier = unwrapped(), session.replier(_identity(p2p))
        out = local.fn(items if local.stream_input else await anext(items), inner)
        if isinstance(out, AsyncIterable):
            async for item in out:
                yield _wrap(item, replier)
        else:
            yield _wrap(await out, replier)
        yield _wrap(None, replier, end=True)  # the seal: the answer is whole
        # Read the caller's stream to its end before returning: hivemind closes the stream once this
        # handler is done, and input still arriving after that (a unary-input handler leaves the seal
        # unread; every caller's end-of-stream follows its seal) makes p2pd reset the stream, which
        # can drop the answer's seal before the relay reads it (a CI run saw "ended without its last
        # signature"). Nothing may follow the seal: one extra message is counted and ends the wait.
        async for _ in items:
            t.refused["input after the answer"] += 1
            return
        async for _ in requests:
            t.refused["input after the answer"] += 1
            return

    return handle


# ---- calling: straight to the peer, or through the relay its route names --------------------------------
def _signer(p2p: P2P, peer: PeerID, name: str) -> tuple[Signer, ReplyCheck]:
    t = table(p2p)
    if t.identity is None or t.checker is None:
        raise TunnelError("this node has no identity to sign forwarded calls with yet")
    return open_call(t.identity, t.checker.verifier, p2p.peer_id.to_base58(), peer.to_base58(), name)


def _answered(check: ReplyCheck, resp: Response) -> bool:
    try:  # the target's own signature on every message of its answer, and a seal on the last
        return check.answered(list(resp.tensors), resp.metadata)
    except AuthError as e:
        raise TunnelError(f"an answer not from {check.peer[-8:]}: {e}") from e


def set_routes(p2p: P2P, routes: dict[str, str]) -> None:
    """Reach each target peer id through the relay peer id given; every other peer directly."""
    table(p2p).routes = dict(routes)


async def unary(p2p: P2P, peer: PeerID, name: str, msg: Message, output_type: type[M] = Response) -> M:
    relay = table(p2p).routes.get(peer.to_base58())
    if relay is None:
        direct: M = await p2p.call_protobuf_handler(peer, name, msg, output_type)
        return direct
    (signer, check), data = _signer(p2p, peer, name), msg.SerializeToString()
    wrapped = Request(uid=route_uid(peer.to_base58(), name), metadata=data, tensors=[signer.sign(data, True)])
    resp = await p2p.call_protobuf_handler(PeerID.from_base58(relay), RELAY_CALL, wrapped, Response)
    if not _answered(check, resp):
        raise TunnelError("a unary answer without its target's seal")
    return output_type.FromString(resp.metadata)


async def stream(
    p2p: P2P,
    peer: PeerID,
    name: str,
    requests: Message | AsyncIterator[Message],
    output_type: type[M] = Response,
) -> AsyncIterator[M]:
    relay = table(p2p).routes.get(peer.to_base58())
    if relay is None:
        answers: AsyncIterator[M] = await p2p.iterate_protobuf_handler(peer, name, requests, output_type)
        return answers

    signer, check = _signer(p2p, peer, name)

    def signed(data: bytes, end: bool = False) -> Request:
        return Request(metadata=data, tensors=[signer.sign(data, end)])

    async def framed() -> AsyncIterator[Request]:
        head = signed(b"")
        head.uid = route_uid(peer.to_base58(), name)
        yield head
        if isinstance(requests, Message):
            yield signed(requests.SerializeToString())
        else:
            async for r in requests:
                yield signed(r.SerializeToString())
        yield signed(b"", end=True)  # the seal: a relay cannot cut the call short unnoticed

    replies = await p2p.iterate_protobuf_handler(PeerID.from_base58(relay), RELAY_STREAM, framed(), Response)

    async def unwrapped() -> AsyncIterator[M]:
        async for resp in replies:
            if _answered(check, resp):
                return
            yield output_type.FromString(resp.metadata)
        raise TunnelError(f"the answer of {peer.to_base58()[-8:]} ended without its last signature")

    return unwrapped()


class Routed:
    """A P2P for hivemind's stubs (ServicerBase.get_stub): their calls take this P2P's tunnel routes."""

    def __init__(self, p2p: P2P):
        self._p2p = p2p

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._p2p, attr)

    async def call_protobuf_handler(self, peer: PeerID, name: str, msg: Message, output_type: type[M]) -> M:
        return await unary(self._p2p, peer, name, msg, output_type)

    async def iterate_protobuf_handler(
        self, peer: PeerID, name: str, requests: Message | AsyncIterator[Message], output_type: type[M]
    ) -> AsyncIterator[M]:
        return await stream(self._p2p, peer, name, requests, output_type)
