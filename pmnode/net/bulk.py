"""Bulk transfers of any size: a snapshot of named tensors, pulled in checksummed chunks.

A replica's state (GBs at real model sizes) or a step's gradient sums do not fit one wire message
(WireLimits, 256 MiB) and should not be copied five times on the way. Instead the sender packs the
tensors once, on its compute thread, into one host buffer (`Snapshot`), and the receiver pulls it
chunk by chunk over an ordinary data RPC; each request's header (its kind and typed meta,
pmnode.net.meta) says what it wants:

    open   BulkOpen(step)           -> {"manifest": BulkManifest as JSON bytes}
    chunk  BulkChunk(ticket, index) -> {"data": CHUNK bytes of the snapshot}
    close  BulkClose(ticket)        -> {} (the sender drops the snapshot)

The manifest's meta is the snapshot's typed model (pmnode.core.snapshot_meta), and a receiver
names the one it expects.

Memory: the sender holds one snapshot (dropped on close or after TTL seconds unused, at most
MAX_SNAPSHOTS at once); the receiver one buffer of the snapshot's size; the wire one chunk. Every
chunk has a sha256 in the manifest, and the manifest's `digest` covers them all and the layout, so
the receiver can resume with another sender whose snapshot has the same digest (sync replicas
are bit-identical) where the first one died, and must start over otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.core.snapshot_meta import SnapshotMeta, StateMeta, SumsMeta
from pmnode.errors import PmnodeError
from pmnode.net.meta import BulkChunk, BulkClose, BulkOpen, BulkRequest
from pmnode.net.wire import DTYPES, DTypeName, WireError

CHUNK = 16 * 2**20
ALIGN = 64  # every tensor starts on a 64-byte boundary, so each is a plain view of the buffer
MAX_SNAPSHOTS = 2
TTL = 120.0  # seconds a snapshot nobody asks for is kept
_NAMES = {v: k for k, v in DTYPES.items()}

Ask = Callable[[str, BulkRequest], Awaitable[Packet]]  # (peer, request) -> reply packet


class TransferError(PmnodeError):
    """No sender completed a transfer, or a chunk failed its checksum."""


class BulkTensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=256)
    dtype: DTypeName
    shape: list[int] = Field(max_length=8)
    offset: int  # its range is checked in check_manifest, against the size the receiver takes


class BulkManifest(BaseModel):
    """What a sender tells a receiver about one snapshot."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ticket: str = Field(max_length=64)
    size: int
    chunk: int
    chunks: list[str] = Field(max_length=2**20)  # sha256 of each chunk, hex
    tensors: list[BulkTensor] = Field(max_length=2**20)
    meta: SnapshotMeta

    @property
    def digest(self) -> str:
        """The content's identity: layout, meta and every chunk's hash (not the ticket)."""
        body = self.model_dump(exclude={"ticket"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Snapshot:
    manifest: BulkManifest
    buffer: bytearray
    used: float = field(default_factory=time.monotonic)
    key: str | None = None  # snapshots of the same content (a step's gradient sums) are shared
    readers: int = 1
    extra: dict[str, bytes] = field(default_factory=dict)  # more tensors of the open's reply (a signature)
    # chunk i of `buffer` as a uint8 tensor, a view made by `pack` (off the loop): answering a chunk
    # makes no tensor on the event loop
    chunks: list[Tensor] = field(default_factory=list)
    opening: Packet | None = None  # the open's reply (manifest and extra), made where the snapshot was


def pack(tensors: dict[str, Tensor], meta: SnapshotMeta, chunk: int = CHUNK) -> Snapshot:
    """Compute thread: copy `tensors` (any device) into one aligned host buffer and hash its chunks."""
    specs, offset = [], 0
    for name, t in tensors.items():
        specs.append(BulkTensor(name=name, dtype=_NAMES[t.dtype], shape=list(t.shape), offset=offset))
        offset += math.ceil(t.numel() * t.element_size() / ALIGN) * ALIGN
    buffer = bytearray(offset)
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if offset else torch.empty(0, dtype=torch.uint8)
    for spec, t in zip(specs, tensors.values(), strict=True):
        n = t.numel() * t.element_size()
        if n:  # one copy, device to host included: a uint8 view gives raw bytes for every dtype
            flat[spec.offset : spec.offset + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    view = memoryview(buffer)
    digests = [hashlib.sha256(view[i : i + chunk]).hexdigest() for i in range(0, offset, chunk)]
    man = BulkManifest(
        ticket=secrets.token_hex(8), size=offset, chunk=chunk, chunks=digests, tensors=specs, meta=meta
    )
    return Snapshot(man, buffer, chunks=[flat[i : i + chunk] for i in range(0, offset, chunk)])


def unpack(manifest: BulkManifest, buffer: bytearray) -> dict[str, Tensor]:
    """Compute thread: the tensors, as views of `buffer` (no copy)."""
    flat = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    out = {}
    for s in manifest.tensors:
        dtype = DTYPES[s.dtype]
        n = math.prod(s.shape) * dtype.itemsize
        out[s.name] = flat[s.offset : s.offset + n].view(dtype).reshape(s.shape)
    return out


def _bytes_packet(parts: dict[str, bytes]) -> Packet:
    return Packet({k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in parts.items()})


def _opened(make: Callable[[], Snapshot]) -> Snapshot:
    """Off the loop: a snapshot and the reply every open of it gets (its manifest, ticket included)."""
    snap = make()
    snap.opening = _bytes_packet({"manifest": snap.manifest.model_dump_json().encode(), **snap.extra})
    return snap


def _sha256(data: object) -> str:
    return hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's 3.10 stubs do not say so


def content_digest(manifest: BulkManifest, buffer: bytearray) -> str:
    """Off the event loop: the digest `manifest` would have over the bytes of `buffer` as they are, every
    chunk hashed again (what a receiver compares with the digest its sender vouched for)."""
    view, c = memoryview(buffer), manifest.chunk
    chunks = [_sha256(view[i : i + c]) for i in range(0, len(buffer), c)]
    return manifest.model_copy(update={"size": len(buffer), "chunks": chunks}).digest


def _manifest(reply: Packet) -> BulkManifest:
    """Off the event loop: the manifest an open was answered with (its tensor's bytes, parsed;
    a ValueError if they are not one)."""
    return BulkManifest.model_validate_json(reply.tensors["manifest"].numpy().tobytes())


def _take_chunk(reply: Packet, into: bytearray, start: int, expect: int, sha256: str) -> bool:
    """Off the event loop (a hash and a copy of up to CHUNK bytes, which would stall every RPC of the
    node there): the chunk into the receive buffer at `start` if it is the one the manifest announced;
    False, with nothing written, if its length or checksum differ."""
    data = reply.tensors["data"].numpy()
    if len(data) != expect or _sha256(data) != sha256:
        return False
    memoryview(into)[start : start + expect] = memoryview(data).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's stubs for 3.10 do not say so
    return True


class BulkServer:
    """The sender's side: snapshots by ticket, answering open, chunk and close."""

    def drop(self) -> None:
        """Forget every snapshot (their content changed: a step's sums were reset or applied)."""
        self.snapshots.clear()

    def __init__(self, make_in_compute: Callable[[Callable[[], Snapshot]], Awaitable[Snapshot]]):
        self.run = make_in_compute  # runs a job on the stage's compute thread
        self.snapshots: dict[str, Snapshot] = {}

    async def answer(self, req: BulkRequest, make: Callable[[], Snapshot], key: str | None = None) -> Packet:
        """One request; `make` builds the snapshot an open asks for, unless one of the same `key` lives."""
        now = time.monotonic()
        for t in [t for t, s in self.snapshots.items() if now - s.used > TTL]:
            del self.snapshots[t]
        if isinstance(req, BulkOpen):
            snap = next((s for s in self.snapshots.values() if key is not None and s.key == key), None)
            if snap is not None:
                snap.readers += 1
            elif len(self.snapshots) >= MAX_SNAPSHOTS:
                raise TransferError(f"busy: {len(self.snapshots)} transfers in progress here")
            else:
                snap = await self.run(lambda: _opened(make))
                snap.key = key
                self.snapshots[snap.manifest.ticket] = snap
            assert snap.opening is not None  # every snapshot here came through _opened
            return snap.opening
        snap = self.snapshots.get(req.ticket)
        if isinstance(req, BulkClose):
            if snap is not None:
                snap.readers -= 1
                if snap.readers <= 0:
                    del self.snapshots[req.ticket]
            return Packet({})
        if snap is None:
            raise WireError("bad payload", "unknown or expired ticket")
        if not req.index < len(snap.manifest.chunks):
            raise WireError("bad payload", f"chunk {req.index} out of range")
        snap.used = now
        return Packet({"data": snap.chunks[req.index]})


def check_manifest(man: BulkManifest, max_size: int) -> None:
    """Refuse a manifest that would make the receiver allocate more than it expects, or whose layout
    does not add up (chunks that do not cover the size, tensors outside the buffer)."""
    if not 0 <= man.size <= max_size:
        raise TransferError(f"the sender announces {man.size} bytes; this receiver takes at most {max_size}")
    if not 0 < man.chunk <= CHUNK or len(man.chunks) != math.ceil(man.size / man.chunk):
        raise TransferError(f"{len(man.chunks)} chunks of {man.chunk} bytes do not make {man.size}")
    for t in man.tensors:
        n = math.prod(t.shape) * DTYPES[t.dtype].itemsize  # no tensor made: this runs on the loop
        if t.offset < 0 or min(t.shape, default=0) < 0 or t.offset + n > man.size:
            raise TransferError(f"tensor {t.name!r} lies outside the {man.size} bytes announced")


@dataclass
class Received:
    manifest: BulkManifest
    buffer: bytearray
    resumed: int = 0  # times a transfer went on with another sender where one had stopped


class Vouching(Protocol):
    """A receiver's check of what each sender vouches for (net.state_digest): it raises to refuse the
    sender, and fetch goes on with the next one."""

    async def opened(self, peer: str, reply: Packet, manifest: BulkManifest) -> None:
        """The open's reply of `peer`, before any chunk is asked for."""

    async def received(self, peer: str, got: Received) -> None:
        """The whole transfer, its last chunk from `peer`, before it is returned."""


async def fetch(
    ask: Ask,
    peers: list[str],
    request: BulkOpen,
    expect: type[SumsMeta] | type[StateMeta],
    say: Callable[[str], None] = lambda _: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    *,
    max_size: int,
    check: Vouching | None = None,
) -> Received:
    """Pull one snapshot from the first of `peers` that completes it; a sender that fails mid-way is
    left for the next, which continues at the same chunk if its snapshot's digest is the same.
    `max_size`: the most bytes the receiver expects (what its own stage holds); a manifest that
    announces more is refused before anything is allocated, and so is one whose meta is not `expect`'s.
    `check`: what each sender must vouch for; a transfer it refuses whole is started over with the
    next sender, never resumed."""
    got: Received | None = None
    done = 0
    for peer in peers:
        try:
            reply = await ask(peer, request)
            man = await asyncio.to_thread(_manifest, reply)
            check_manifest(man, max_size)
            if not isinstance(man.meta, expect):
                raise TransferError(f"{peer[-8:]} sends a {type(man.meta).__name__}, not a {expect.__name__}")
            if check is not None:
                await check.opened(peer, reply, man)
            if got is not None and man.digest == got.manifest.digest:
                got.manifest, got.resumed = man, got.resumed + 1  # same content, this sender's ticket
                say(f"resuming at chunk {done}/{len(man.chunks)} from {peer[-8:]}")
            else:
                got, done = Received(man, bytearray(man.size)), 0
            while done < len(man.chunks):
                reply = await ask(peer, BulkChunk(ticket=man.ticket, index=done))
                start = done * man.chunk
                length = min(man.chunk, man.size - start)
                args = (reply, got.buffer, start, length, man.chunks[done])
                if not await asyncio.to_thread(_take_chunk, *args):
                    raise TransferError(f"chunk {done} from {peer[-8:]} failed its checksum")
                done += 1
                progress(done, len(man.chunks))
            if check is not None:
                whole, got, done = got, None, 0  # refused: the next sender starts over
                await check.received(peer, whole)
                got, done = whole, len(man.chunks)
            try:
                await ask(peer, BulkClose(ticket=man.ticket))
            except Exception as e:  # the snapshot expires on its own
                say(f"could not close the transfer at {peer[-8:]}: {e}")
            return got
        except (PmnodeError, KeyError, ValueError) as e:  # TransportError, WireError, bad manifest
            say(f"transfer from {peer[-8:]} stopped at chunk {done}: {e}")
    raise TransferError(f"no sender completed the transfer (tried {len(peers)})")
