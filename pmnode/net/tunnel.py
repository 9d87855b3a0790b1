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

Each P2P has one `Tunnel`, made by whoever creates the P2P and handed to what serves and calls through
it: every pmnode handler registers with it (`add_handler`) so a forwarded call finds it, and every
pmnode call goes out through its `unary`/`stream`, which take the route set by `set_routes`. Any protobuf
service can use it: a forwarded message carries the caller's message serialized in an ExpertRequest
(and the reply likewise), and a handler named `NAMESPACE::...` (hivemind's servicers) is reached
through doors of its own namespace, so a servicer in another process on the same daemon (hivemind's
averager) keeps its own. `Routed` gives hivemind's stubs the same routes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
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


def _wrap(msg: Message | None, replier: Signer, end: bool = False) -> Response:
    """An answer to a forwarded call, signed by this node: the relay cannot answer in its name."""
    data = b"" if msg is None else msg.SerializeToString()
    return Response(metadata=data, tensors=[replier.sign(data, end)])


def _answered(check: ReplyCheck, resp: Response) -> bool:
    try:  # the target's own signature on every message of its answer, and a seal on the last
        return check.answered(list(resp.tensors), resp.metadata)
    except AuthError as e:
        raise TunnelError(f"an answer not from {check.peer[-8:]}: {e}") from e


class Tunnel:
    """One P2P's side of the tunnel: its handlers, whom it reaches through which relay, whom it trusts.

    Made once per P2P by whoever creates that transport (the node, the coordinator, the averager's
    process, a one-off caller) and handed to what serves and calls through it; a second Tunnel on the
    same P2P would find the VIA doors taken.
    """

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.handlers: dict[str, _Local] = {}
        self.routes: dict[str, str] = {}  # target peer id -> relay peer id
        self.relays: set[str] = set()  # relays that may forward calls to us
        self.forwarded: Counter[str] = Counter()  # handler -> calls that came through a relay
        self.refused: Counter[str] = Counter()  # reason -> forwarded calls refused
        self.doors: set[str] = set()  # namespaces whose VIA_* handlers are registered
        self.on_arrival: Callable[[str], None] | None = None  # told each forwarded call's handler name
        self.identity: Identity | None = None  # signs the calls this side sends through a relay
        self.checker: Checker | None = None  # checks the callers' proofs on forwarded calls; none: refuse

    # ---- serving: every handler is reachable directly and through a relay ----------------------------
    async def add_handler(
        self,
        name: str,
        fn: Fn,
        *,
        input_type: type[Message] = Request,
        stream_input: bool = False,
        stream_output: bool = False,
        registered: bool = False,
    ) -> None:
        """p2p.add_protobuf_handler (unless `registered` already), also reachable through the VIA doors."""
        p2p = self.p2p
        if not registered:
            await p2p.add_protobuf_handler(
                name, fn, input_type, stream_input=stream_input, stream_output=stream_output
            )
        call_door, stream_door = via_names(name)
        if call_door not in self.doors:  # the first handler of a namespace brings its doors
            self.doors.add(call_door)
            await p2p.add_protobuf_handler(call_door, self._via_call, Request)
            await p2p.add_protobuf_handler(
                stream_door, self._via_stream, Request, stream_input=True, stream_output=True
            )
        self.handlers[name] = _Local(fn, input_type, stream_input, stream_output)

    def set_identity(self, identity: Identity, verifier: Verifier) -> None:
        """Sign forwarded calls with `identity`; check the callers of calls forwarded to us by `verifier`."""
        self.identity, self.checker = identity, Checker(verifier, self.p2p.peer_id.to_base58())

    def trust_relays(self, relays: Iterable[str]) -> None:
        """Accept forwarded calls from these relays (multiaddrs ending in /p2p/ID, or bare peer ids)."""
        self.relays = {r.rsplit("/p2p/", 1)[-1] for r in relays}

    def set_routes(self, routes: dict[str, str]) -> None:
        """Reach each target peer id through the relay peer id given; every other peer directly."""
        self.routes = dict(routes)

    def _arrival(self, req: Request, ctx: P2PContext) -> tuple[_Local, P2PContext, Session]:
        if ctx.remote_id.to_base58() not in self.relays:
            self.refused["not our relay"] += 1
            raise TunnelError("forwarded by a peer that is not this node's relay")
        caller, name = parse_uid(req.uid)
        local = self.handlers.get(name)
        if local is None:
            self.refused["unknown handler"] += 1
            raise TunnelError(f"no handler {name!r}")
        if self.checker is None:
            self.refused["no authority"] += 1
            raise TunnelError("this node cannot check callers yet")
        try:  # the caller's own proof, not the relay's word
            session = self.checker.first(list(req.tensors), req.metadata, caller.to_base58(), name)
        except AuthError as e:
            self.refused["unproven caller"] += 1
            raise TunnelError(str(e)) from e
        self.forwarded[name] += 1
        if self.on_arrival is not None:
            self.on_arrival(name)
        return local, P2PContext(handle_name=name, local_id=self.p2p.peer_id, remote_id=caller), session

    def _signing(self) -> Identity:
        if (
            self.identity is None
        ):  # set_identity sets it with the checker, before any forwarded call is let in
            raise TunnelError("this node has no identity to sign its answers with yet")
        return self.identity

    async def _via_call(self, req: Request, ctx: P2PContext) -> Response:
        local, inner, session = self._arrival(req, ctx)
        if local.stream_input or local.stream_output or not session.ended:
            raise TunnelError(f"{inner.handle_name} is a stream handler")
        out = await local.fn(local.input_type.FromString(req.metadata), inner)
        return _wrap(out, session.replier(self._signing()), end=True)

    async def _via_stream(self, requests: AsyncIterator[Request], ctx: P2PContext) -> AsyncIterator[Response]:
        head = await anext(requests)
        local, inner, session = self._arrival(head, ctx)
        refused = self.refused

        async def unwrapped() -> AsyncIterator[Message]:
            async for r in requests:
                try:  # each message the next one its caller signed, checked before the handler sees it
                    session.next(list(r.tensors), r.metadata)
                except AuthError as e:
                    refused["unproven caller"] += 1
                    raise TunnelError(str(e)) from e
                if session.ended:  # the caller's seal: the call is whole
                    return
                yield local.input_type.FromString(r.metadata)
            refused["cut short"] += 1
            raise TunnelError("the call ended without its caller's last signature")

        items, replier = unwrapped(), session.replier(self._signing())
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
            refused["input after the answer"] += 1
            return
        async for _ in requests:
            refused["input after the answer"] += 1
            return

    # ---- calling: straight to the peer, or through the relay its route names ----------------------------
    def _signer(self, peer: PeerID, name: str) -> tuple[Signer, ReplyCheck]:
        if self.identity is None or self.checker is None:
            raise TunnelError("this node has no identity to sign forwarded calls with yet")
        me = self.p2p.peer_id.to_base58()
        return open_call(self.identity, self.checker.verifier, me, peer.to_base58(), name)

    async def unary(self, peer: PeerID, name: str, msg: Message, output_type: type[M] = Response) -> M:
        relay = self.routes.get(peer.to_base58())
        if relay is None:
            direct: M = await self.p2p.call_protobuf_handler(peer, name, msg, output_type)
            return direct
        (signer, check), data = self._signer(peer, name), msg.SerializeToString()
        uid = route_uid(peer.to_base58(), name)
        wrapped = Request(uid=uid, metadata=data, tensors=[signer.sign(data, True)])
        resp = await self.p2p.call_protobuf_handler(PeerID.from_base58(relay), RELAY_CALL, wrapped, Response)
        if not _answered(check, resp):
            raise TunnelError("a unary answer without its target's seal")
        return output_type.FromString(resp.metadata)

    async def stream(
        self,
        peer: PeerID,
        name: str,
        requests: Message | AsyncIterator[Message],
        output_type: type[M] = Response,
    ) -> AsyncIterator[M]:
        relay = self.routes.get(peer.to_base58())
        if relay is None:
            answers: AsyncIterator[M] = await self.p2p.iterate_protobuf_handler(
                peer, name, requests, output_type
            )
            return answers

        signer, check = self._signer(peer, name)

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

        relay_id = PeerID.from_base58(relay)
        replies = await self.p2p.iterate_protobuf_handler(relay_id, RELAY_STREAM, framed(), Response)

        async def unwrapped() -> AsyncIterator[M]:
            async for resp in replies:
                if _answered(check, resp):
                    return
                yield output_type.FromString(resp.metadata)
            raise TunnelError(f"the answer of {peer.to_base58()[-8:]} ended without its last signature")

        return unwrapped()


class Routed:
    """A P2P for hivemind's stubs (ServicerBase.get_stub): their calls take this tunnel's routes."""

    def __init__(self, tunnel: Tunnel):
        self._tunnel = tunnel

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._tunnel.p2p, attr)

    async def call_protobuf_handler(self, peer: PeerID, name: str, msg: Message, output_type: type[M]) -> M:
        return await self._tunnel.unary(peer, name, msg, output_type)

    async def iterate_protobuf_handler(
        self, peer: PeerID, name: str, requests: Message | AsyncIterator[Message], output_type: type[M]
    ) -> AsyncIterator[M]:
        return await self._tunnel.stream(peer, name, requests, output_type)
