"""Proof of the real caller on a forwarded call: the relay carries it, but cannot make it.

A call through a relay (net.tunnel) reaches its target over the relay's connection, so libp2p
authenticates the relay, not the caller. The caller therefore signs every message of the call with
its own node key: the target, the handler, its own peer id, a nonce and time for the call, the
message's place in the call and a sha256 of its bytes. The first message also carries the caller's
certificate, which binds that key to its peer id under the run's authority. The target checks all
of it before the handler sees a byte: the certificate against the authority, each signature, the
time within FRESH seconds, the nonce never seen before, the messages in order and the call's last
message signed as the last. So a relay can drop or delay a call, but not make one in another
member's name, change one, splice one into another, cut one short unnoticed or replay one.

Replies come back the same way, signed by the target (marked as replies, bound to the call's nonce),
and the caller checks them likewise (`ReplyCheck`): the relay cannot answer in the target's name.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pmnode.net.auth import AuthError, Cert, Verifier, canonical

PROOF = "pmnode.proof"  # dtype of the runtime_pb2.Tensor that carries a message's proof
FRESH = 60.0  # seconds a call's time may differ from the target's clock
MAX_NONCES = 65536  # nonces remembered (each for 2 x FRESH); a call beyond that waits its turn


class CallProof(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caller: str = Field(max_length=128)
    target: str = Field(max_length=128)
    name: str = Field(max_length=512)
    nonce: str = Field(min_length=16, max_length=64)
    time: float
    index: int = Field(ge=0)
    end: bool  # the call's last message: nothing after it belongs to the call
    reply: bool = False  # signed by the target, answering the call of this nonce
    digest: str = Field(max_length=64)  # sha256 of the message's bytes, hex
    cert: Cert | None = None  # on the first message
    sig: str = ""

    def body(self) -> bytes:
        return canonical(self.model_dump(exclude={"sig", "cert"}))


@dataclass
class Identity:
    """This process's signing key and certificate (a node's record key: Membership)."""

    key: RSAPrivateKey
    cert: Callable[[], Cert]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Signer:
    """The caller's side of one forwarded call: signs its messages in order."""

    me: Identity
    caller: str
    target: str
    name: str
    nonce: str
    now: float = field(default_factory=time.time)
    index: int = 0
    reply: bool = False  # `caller` is then the answering target, `target` the one who called

    def sign(self, data: bytes, end: bool) -> runtime_pb2.Tensor:
        proof = CallProof(
            caller=self.caller, target=self.target, name=self.name, nonce=self.nonce, time=self.now,
            index=self.index, end=end, digest=digest(data), cert=self.me.cert() if self.index == 0 else None,
            reply=self.reply,
        )  # fmt: skip
        proof.sig = self.me.key.sign(proof.body()).decode()
        self.index += 1
        return runtime_pb2.Tensor(buffer=proof.model_dump_json().encode(), dtype=PROOF)


def _proof(tensors: list[runtime_pb2.Tensor]) -> CallProof:
    if len(tensors) != 1 or tensors[0].dtype != PROOF or len(tensors[0].buffer) > 16384:
        raise AuthError("unauthorized", "a forwarded message without its caller's proof")
    try:
        return CallProof.model_validate_json(tensors[0].buffer)
    except ValidationError as e:
        raise AuthError("unauthorized", "a malformed caller's proof") from e


class Checker:
    """The target's side: checks the first message of forwarded calls and remembers their nonces."""

    def __init__(self, verifier: Verifier, me: str, clock: Callable[[], float] = time.time):
        self.verifier, self.me, self.clock = verifier, me, clock
        self.nonces: OrderedDict[str, float] = OrderedDict()  # nonce -> forgotten after

    def first(self, tensors: list[runtime_pb2.Tensor], data: bytes, caller: str, name: str) -> Session:
        """Check a call's first message (the relay says it is from `caller` to handler `name`)."""
        proof, now = _proof(tensors), self.clock()
        expect = (caller, self.me, name, 0, False)  # a call, never an answer replayed as one
        if (proof.caller, proof.target, proof.name, proof.index, proof.reply) != expect:
            raise AuthError("unauthorized", "the caller's proof is for another call")
        if proof.cert is None:
            raise AuthError("unauthorized", "the caller's proof carries no certificate")
        self.verifier.check_cert(proof.cert, peer_id=caller, now=now)
        if abs(now - proof.time) > FRESH:
            raise AuthError("unauthorized", f"a call made {now - proof.time:.0f} s from now")
        session = Session(self.verifier, proof.cert, proof)
        session.check(proof, data)  # signed and whole before its nonce counts: forgeries burn none
        self._remember(proof.nonce, now)
        return session

    def _remember(self, nonce: str, now: float) -> None:
        while self.nonces and next(iter(self.nonces.values())) < now:
            self.nonces.popitem(last=False)
        if nonce in self.nonces:
            raise AuthError("unauthorized", "a replayed call")
        if len(self.nonces) >= MAX_NONCES:  # every one still fresh: refuse rather than forget one
            raise AuthError("rate limited", "too many forwarded calls at once")
        self.nonces[nonce] = now + 2 * FRESH


@dataclass
class Session:
    """One forwarded call being received: each message must be the next one the caller signed."""

    verifier: Verifier
    cert: Cert
    first: CallProof
    index: int = 0
    ended: bool = False

    def check(self, proof: CallProof, data: bytes) -> None:
        f = self.first
        same = (proof.caller, proof.target, proof.name, proof.nonce, proof.time)
        if self.ended or same != (f.caller, f.target, f.name, f.nonce, f.time) or proof.index != self.index:
            raise AuthError("unauthorized", "a message out of its call's order")
        if proof.digest != digest(data):
            raise AuthError("unauthorized", "a message changed on the way")
        if not self.verifier.node_key(self.cert).verify(proof.body(), proof.sig.encode()):
            raise AuthError("unauthorized", "the caller's signature does not verify")
        self.index, self.ended = self.index + 1, proof.end

    def next(self, tensors: list[runtime_pb2.Tensor], data: bytes) -> None:
        self.check(_proof(tensors), data)

    def replier(self, me: Identity) -> Signer:
        """The target's signer for its answer to this call."""
        f = self.first
        return Signer(me, f.target, f.caller, f.name, f.nonce, reply=True)


@dataclass
class ReplyCheck:
    """The caller's side of a forwarded call's answer: signed by `peer`, for the call of `nonce`."""

    verifier: Verifier
    me: str
    peer: str
    name: str
    nonce: str
    session: Session | None = None

    def next(self, tensors: list[runtime_pb2.Tensor], data: bytes) -> None:
        if self.session is not None:
            self.session.next(tensors, data)
            return
        proof = _proof(tensors)
        expect = (self.peer, self.me, self.name, self.nonce, 0, True)
        if (proof.caller, proof.target, proof.name, proof.nonce, proof.index, proof.reply) != expect:
            raise AuthError("unauthorized", "an answer to another call")
        if proof.cert is None:
            raise AuthError("unauthorized", "an answer without its certificate")
        self.verifier.check_cert(proof.cert, peer_id=self.peer)
        session = Session(self.verifier, proof.cert, proof)
        session.check(proof, data)
        self.session = session

    def answered(self, tensors: list[runtime_pb2.Tensor], data: bytes) -> bool:
        """Check the answer's next message; whether it is the target's seal (the answer is whole)."""
        self.next(tensors, data)
        return self.session is not None and self.session.ended


def open_call(
    me: Identity, verifier: Verifier, caller: str, target: str, name: str
) -> tuple[Signer, ReplyCheck]:
    """The caller's signer for a new forwarded call, and the check of the answer it must get."""
    nonce = secrets.token_hex(16)
    return Signer(me, caller, target, name, nonce), ReplyCheck(verifier, caller, target, name, nonce)
