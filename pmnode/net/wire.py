"""Wire format of one data-plane message: a JSON header, then raw tensor bytes.

    [u32 little-endian header length][header JSON, UTF-8][tensor 0 bytes][tensor 1 bytes]...

The header names each tensor's dtype and shape, so the payload is exactly the
codec's bytes with no per-element framing. The framing overhead is the 4-byte
prefix plus the compact header, about 250-350 bytes for a typical activation
message (`framing_overhead` states it exactly). `decode` checks everything
before any tensor reaches a model: lengths, schema, dtypes, shapes, sizes,
finiteness (unless the caller's own check covers it); a bad message raises
WireError whose `reason` is one short phrase.

Both touch tensor bytes (a copy each, and a scan for NaN/Inf), so a node runs them off the event
loop, as jobs of its runner (pmnode.net.jobs).
"""

from __future__ import annotations

import math
import struct
import sys
from typing import Literal, TypeVar, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pmnode.core.codecs import Packet
from pmnode.errors import PmnodeError
from pmnode.net.meta import META_OF, Kind, Meta

if sys.byteorder != "little":  # raw tensor bytes are sent in host order, which must be the wire's
    raise ImportError("pmnode.net.wire needs a little-endian host")

DTypeName = Literal["float32", "float16", "bfloat16", "int8", "uint8", "int16", "uint16", "int32", "int64"]
DTYPES: dict[DTypeName, torch.dtype] = {name: getattr(torch, name) for name in get_args(DTypeName)}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
_FLOATS = {"float32", "float16", "bfloat16"}
_LEN = struct.Struct("<I")
_MAX_DIMS = 8
M = TypeVar("M", bound=Meta)


class WireError(PmnodeError):
    """A message that is not what it claims to be; `reason` is a short fixed phrase, for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    dtype: DTypeName
    shape: list[int]  # bounds are checked in decode, so a bad shape gets its own reason

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


class MessageHeader(BaseModel):
    """Where a message comes from and goes, its tensors' layout, and its kind's typed meta (net.meta)."""

    # strict: "3" is not a stage; NaN/Inf in meta survive the round trip (a diverged loss is still news)
    model_config = ConfigDict(extra="forbid", strict=True, ser_json_inf_nan="constants")

    kind: Kind
    run: str = Field(max_length=128)
    micro_batch: str = Field(max_length=128)
    stage: int = Field(ge=0)
    step: int = Field(ge=0)
    sender: str = Field("", max_length=128)
    tensors: list[TensorSpec] = Field(default_factory=list, max_length=64)
    meta: Meta

    @model_validator(mode="before")
    @classmethod
    def _meta_of_kind(cls, data: object) -> object:
        """The meta is the model of the header's kind, never another's: a dict (as decoded from the
        wire, or an empty one for a kind's defaults) is validated strictly as that model."""
        if not isinstance(data, dict) or data.get("kind") not in META_OF:
            return data  # not a dict, or an unknown kind: the fields' own checks say so
        model, meta = META_OF[data["kind"]], data.get("meta", {})
        if type(meta) is not model:
            meta = model.model_validate(meta)  # a ValidationError: the header is refused
        return {**data, "meta": meta}

    def meta_as(self, model: type[M]) -> M:
        """The meta as `model`, or WireError if this message is of another kind than its RPC takes."""
        if not isinstance(self.meta, model):
            raise WireError("bad payload", f"a {self.kind} message where {model.kind} is expected")
        return self.meta

    @classmethod
    def of(
        cls, meta: Meta, *, run: str, micro_batch: str, stage: int, step: int, sender: str = ""
    ) -> MessageHeader:
        """A header of `meta`'s kind."""
        return cls(
            kind=meta.kind, run=run, micro_batch=micro_batch, stage=stage, step=step, sender=sender, meta=meta
        )


class WireLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(256 * 2**20, gt=0)
    max_tensors: int = Field(8, ge=0)
    max_header: int = Field(4096, gt=0)


def _header_with_specs(header: MessageHeader, packet: Packet) -> MessageHeader:
    specs = []
    for name, t in packet.tensors.items():
        if t.dtype not in _NAMES:
            raise WireError("unknown dtype", f"tensor {name!r} is {t.dtype}")
        specs.append(TensorSpec(name=name, dtype=_NAMES[t.dtype], shape=list(t.shape)))
    return header.model_copy(update={"tensors": specs})


def _header_json(header: MessageHeader) -> bytes:
    return header.model_dump_json(exclude_defaults=True).encode()  # compact; defaults cost nothing


def encode(header: MessageHeader, packet: Packet) -> bytes:
    """One message; the header's tensor specs come from the packet."""
    head = _header_json(_header_with_specs(header, packet))
    blobs: list[bytes | memoryview] = [_LEN.pack(len(head)), head]
    for name, t in packet.tensors.items():
        if t.device.type != "cpu":  # a copy from the GPU here would wait for the device on the event loop
            raise WireError("not on the host", f"tensor {name!r} is on {t.device}: Packet.on_host() first")
        # a flat uint8 view gives raw bytes for every dtype (bfloat16 and uint16 too) with no numpy dtype
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        blobs.append(memoryview(flat))  # type: ignore[arg-type]  # an ndarray is a buffer; numpy's stubs for 3.10 do not say so
    return b"".join(blobs)  # the one copy of the tensor bytes


def framing_overhead(message: MessageHeader | bytes, packet: Packet | None = None) -> int:
    """Bytes of a message that are not tensor payload (total - packet.nbytes).

    Pass encoded bytes, or a header (with a packet to fill in its tensor specs, as `encode` does).
    """
    if isinstance(message, MessageHeader):
        header = message if packet is None else _header_with_specs(message, packet)
        return _LEN.size + len(_header_json(header))
    if len(message) < _LEN.size:
        raise WireError("too short")
    size: int = _LEN.unpack_from(message)[0]
    return _LEN.size + size


def _parse_header(raw: bytes) -> MessageHeader:
    try:
        return MessageHeader.model_validate_json(raw)
    except ValidationError as e:
        if any(err["loc"][-1:] == ("dtype",) for err in e.errors()):
            raise WireError("unknown dtype") from None
        raise WireError("bad header", f"{e.error_count()} invalid field(s)") from None


def decode(
    data: bytes | bytearray | memoryview, limits: WireLimits | None = None, *, finite: bool = True
) -> tuple[MessageHeader, Packet]:
    """Parse and validate one message; the tensors own their memory (no alias of `data`).

    finite=False skips the scan for NaN and Inf, for a caller whose own check of the payload refuses
    them (net.checks.check_activation and check_gradient do): one scan per payload, not two.
    """
    limits = limits or WireLimits()
    data = memoryview(data).cast("B")
    if len(data) < _LEN.size:
        raise WireError("too short", f"{len(data)} bytes")
    if len(data) > limits.max_bytes:
        raise WireError("too large", f"{len(data)} bytes > {limits.max_bytes}")
    (hlen,) = _LEN.unpack_from(data)
    if not 2 <= hlen <= min(limits.max_header, len(data) - _LEN.size):
        raise WireError("bad header length", str(hlen))
    header = _parse_header(bytes(data[_LEN.size : _LEN.size + hlen]))
    specs = header.tensors
    if len(specs) > limits.max_tensors:
        raise WireError("too many tensors", f"{len(specs)} > {limits.max_tensors}")
    if len({s.name for s in specs}) != len(specs):
        raise WireError("duplicate tensor name")
    for s in specs:
        if len(s.shape) > _MAX_DIMS or any(d < 0 for d in s.shape):
            raise WireError("bad shape", f"{s.name!r}: {s.shape}")
        if s.nbytes > limits.max_bytes:  # python ints: a huge shape cannot overflow
            raise WireError("too large", f"{s.name!r}: {s.shape}")
    body, described = len(data) - _LEN.size - hlen, sum(s.nbytes for s in specs)
    if body != described:
        raise WireError("size mismatch", f"payload {body} bytes, header describes {described}")
    tensors, offset = {}, _LEN.size + hlen
    for s in specs:
        n = s.nbytes
        # bytearray(...) is the one copy: the tensor keeps it alive and never aliases the receive buffer
        raw = bytearray(data[offset : offset + n])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        t = flat.view(DTYPES[s.dtype]).reshape(s.shape)
        if finite and s.dtype in _FLOATS and n and not all(map(math.isfinite, torch.aminmax(t))):
            # min and max carry any NaN and any Inf; one pass, no boolean tensor (isfinite.all: ~6x slower)
            raise WireError("non-finite", f"tensor {s.name!r} holds NaN or Inf")
        tensors[s.name] = t
        offset += n
    return header, Packet(tensors)
