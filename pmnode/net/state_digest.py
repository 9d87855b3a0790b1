"""A replica's state copy, vouched for by its source: a digest it signs with its own node key.

A copy of a stage's weights and optimizer state comes from a certified replica of the stage, but
certified is not honest, and the bytes may reach the receiver by way of a relay. So the source signs
a `StateDigest` of the snapshot it serves: the run, the stage, the step, its own peer id and the
snapshot's digest (net.bulk's: layout, scalars and a sha256 of every chunk of the packed bytes). It
rides in the open's reply beside the manifest. The receiver (`StateCheck`) checks it with the key of
the certificate it checked for that peer (its hello), before it asks for a single chunk, and when the
last chunk is in it hashes the bytes as received again and compares. A copy that fails any of this
is refused with a reason the node counts, the sender is struck (the node's guard), and the copy goes
on with the next replica, from the start.

What a signature adds to the chunks' checksums: a sender cannot pass off another's state (or state of
another stage or step) as its own without the other's key, and a refused copy names its source with
proof, so a strike is never a relay's word.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pmnode.core.codecs import Packet
from pmnode.net.auth import Cert, Verifier, canonical
from pmnode.net.bulk import BulkManifest, Received, TransferError, content_digest
from pmnode.net.callproof import Identity

SIGNED = "signed"  # the open reply's tensor that carries the source's StateDigest (JSON bytes)
MAX_SIGNED = 16384  # bytes: a signed digest is a few hundred; more is refused unread

# The reasons a copy is refused, as counted in the node's rejected table (Guard.rejected).
UNSIGNED = "state unsigned"
OTHER_SOURCE = "state of another source"  # vouched for by a peer other than the sender, or another run/stage
OTHER_STEP = "state of another step"
BAD_SIGNATURE = "state signature invalid"
BAD_DIGEST = "state digest mismatch"


class StateDigest(BaseModel):
    """What a replica vouches for when it serves its state: this content, of this run, stage and step,
    is mine (`source`), signed with the key its certificate names."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(max_length=256)
    stage: int = Field(ge=0)
    step: int = Field(ge=0)
    source: str = Field(max_length=128)
    digest: str = Field(min_length=64, max_length=64)  # BulkManifest.digest, hex sha256
    sig: str = Field(default="", max_length=4096)

    def body(self) -> bytes:
        return canonical(self.model_dump(exclude={"sig"}))


class StateRefused(TransferError):
    """A state copy refused for what its sender vouched for; `reason` is one of the fixed phrases above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def vouch(me: Identity, *, run: str, stage: int, source: str, manifest: BulkManifest) -> StateDigest:
    """The sender's side, on its compute thread: sign the snapshot it is about to serve."""
    signed = StateDigest(run=run, stage=stage, step=manifest.meta.step, source=source, digest=manifest.digest)
    signed.sig = me.key.sign(signed.body()).decode()
    return signed


def _signed(reply: Packet) -> StateDigest:
    t = reply.tensors.get(SIGNED)
    if t is None or t.numel() > MAX_SIGNED:
        raise StateRefused(UNSIGNED, "the copy comes without its source's signed digest")
    try:
        return StateDigest.model_validate_json(t.numpy().tobytes())
    except ValidationError as e:
        raise StateRefused(UNSIGNED, "a malformed signed digest") from e


@dataclass
class StateCheck:
    """The receiver's side (net.bulk.Vouching): every sender's signed digest, then the bytes received.

    `cert_of`: the certificate this node checked for a peer (Downstream.greeted); `step`: the step the
    copy must be of, if one was asked for; `refused(peer, reason)`: the node counts it and strikes."""

    verifier: Verifier
    run: str
    stage: int
    cert_of: Callable[[str], Cert | None]
    step: int | None = None
    refused: Callable[[str, str], None] = lambda peer, reason: None
    vouched: dict[str, StateDigest] = field(default_factory=dict)  # sender -> what it signed (this copy)

    def verify(self, peer: str, reply: Packet, manifest: BulkManifest, cert: Cert) -> StateDigest:
        """Off the event loop (a JSON parse, an RSA verify): StateRefused unless `peer` vouched for
        exactly this manifest, of this run, stage and step."""
        signed = _signed(reply)
        if (signed.source, signed.run, signed.stage) != (peer, self.run, self.stage):
            who = f"{signed.source[-8:]}'s, of {signed.run!r} stage {signed.stage}"
            raise StateRefused(OTHER_SOURCE, f"{peer[-8:]} serves a digest vouched as {who}")
        step = manifest.meta.step
        if signed.step != step or (self.step is not None and signed.step != self.step):
            asked = f", {self.step} asked for" if self.step is not None else ""
            raise StateRefused(OTHER_STEP, f"signed for step {signed.step}, the copy says {step!r}{asked}")
        if signed.digest != manifest.digest:
            raise StateRefused(BAD_DIGEST, f"{peer[-8:]} signed another content than it serves")
        if not self.verifier.node_key(cert).verify(signed.body(), signed.sig.encode()):
            raise StateRefused(BAD_SIGNATURE, f"{peer[-8:]}'s digest is not signed with its certified key")
        return signed

    async def opened(self, peer: str, reply: Packet, manifest: BulkManifest) -> None:
        cert = self.cert_of(peer)
        if cert is None:  # its certificate was forgotten meanwhile (ours renewed): not its fault
            raise TransferError(f"no checked certificate of {peer[-8:]} to verify its state with")
        try:
            self.vouched[peer] = await asyncio.to_thread(self.verify, peer, reply, manifest, cert)
        except StateRefused as e:
            self.refused(peer, e.reason)
            raise

    async def received(self, peer: str, got: Received) -> None:
        signed = self.vouched.get(peer)
        actual = await asyncio.to_thread(content_digest, got.manifest, got.buffer)
        if signed is None or actual != signed.digest:
            self.refused(peer, BAD_DIGEST)
            raise StateRefused(BAD_DIGEST, f"the bytes received from {peer[-8:]} are not what it signed")
