"""pmnode.net.wire: bit-exact round trips, the framing overhead, and every rejection."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from pmnode.core.codecs import Packet
from pmnode.net.meta import ActivationMeta, BulkChunk, ErrorMeta, GradientMeta, LossMeta
from pmnode.net.wire import DTYPES, MessageHeader, WireError, WireLimits, decode, encode, framing_overhead

PEER = "12D3KooWQmSQsu9sHKtAzR88drkboS5Nqw54Snb2we4T94ArUibbb7"  # a peer id's typical length


def _header(**kw: object) -> MessageHeader:
    fields = dict(kind="activation", run="tiny-run", micro_batch="12:3", stage=1, step=12, sender=PEER)
    return MessageHeader(**{**fields, **kw})


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        vals = [0.0, -0.0, 1.0, -2.5, info.max, info.min, info.tiny, info.tiny / 4, info.eps]  # subnormal too
        return torch.cat([torch.tensor(vals, dtype=dtype), torch.randn(23).to(dtype)])
    info = torch.iinfo(dtype)
    vals = torch.tensor([info.min, info.max, 0, 1], dtype=torch.int64).to(dtype)
    return torch.cat([vals, torch.randint(info.min, info.max, (28,), dtype=torch.int64).to(dtype)])


def _raw(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + payload


def _base(**kw: object) -> dict:
    return {"kind": "activation", "run": "r", "micro_batch": "0", "stage": 0, "step": 0, "tensors": [], **kw}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_round_trip_is_bit_exact(name: str) -> None:
    dtype = DTYPES[name]
    base = _edge_values(dtype)
    packet = Packet(
        {
            "v": base.reshape(4, 8),
            "strided": base.reshape(4, 8).t(),  # non-contiguous input
            "scalar": base[2].clone(),  # 0-dim
            "empty": base[:0].reshape(0, 5),
        }
    )
    data = encode(_header(), packet)
    header, out = decode(data)
    assert [s.name for s in header.tensors] == list(packet.tensors)
    for k, t in packet.tensors.items():
        got = out.tensors[k]
        assert got.dtype == dtype and got.shape == t.shape
        assert _bits(got) == _bits(t)
    assert len(data) == framing_overhead(data) + packet.nbytes


def test_decoded_tensors_own_their_memory() -> None:
    data = bytearray(encode(_header(), Packet({"v": torch.arange(6, dtype=torch.float32)})))
    _, out = decode(data)
    data[-4:] = b"\x00" * 4  # scribble on the receive buffer
    assert out.tensors["v"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    out.tensors["v"].add_(1)  # writable, and no alias back into `data`
    assert decode(bytes(data))[1].tensors["v"][0].item() == 0.0


def test_header_fields_round_trip() -> None:
    header = _header(kind="activation", meta=ActivationMeta(samples=8, attempt=77))
    got, _ = decode(encode(header, Packet({})))
    assert got == header and isinstance(got.meta, ActivationMeta)
    assert got.meta_as(ActivationMeta).samples == 8 and got.meta_as(ActivationMeta).attempt == 77
    loss = decode(encode(_header(kind="gradient", meta=GradientMeta(loss=float("nan"))), Packet({})))[0]
    assert math.isnan(loss.meta_as(GradientMeta).loss)  # a diverged loss still travels
    chunk = MessageHeader.of(BulkChunk(ticket="ab", index=3), run="r", micro_batch="m", stage=0, step=3)
    got = decode(encode(chunk, Packet({})))[0]
    assert got.kind == "chunk" and got.meta == BulkChunk(ticket="ab", index=3)
    assert _header(kind="error", meta={"reason": "x"}).meta == ErrorMeta(reason="x")  # a dict is its kind's


def test_meta_is_its_kinds_model_only() -> None:
    """A header whose meta has an unknown or ill-typed field, or is another kind's, is refused; a
    handler that asks for another kind's meta gets a WireError (a counted refusal), not a crash."""
    for kind, meta in (
        ("activation", {"samples": 2, "note": "x"}),  # unknown field
        ("activation", {"samples": "2"}),  # a string is not a count
        ("activation", {"samples": True}),  # nor a bool
        ("activation", {"samples": -1}),
        ("activation", {"attempt": 2**31}),  # bounded
        ("gradient", {"loss": "0.5"}),
        ("error", {"reason": "x" * 301}),
        ("check", {"op": "lie", "at": 3}),
        ("chunk", {"ticket": "t"}),  # no index
        ("gradient", LossMeta(loss=1.0)),  # another kind's model
    ):
        with pytest.raises(ValueError):
            _header(kind=kind, meta=meta)
        if not isinstance(meta, dict):  # on the wire a loss is a loss: a gradient's meta may carry it
            continue
        with pytest.raises(WireError) as info:
            decode(_raw({**_base(kind=kind), "meta": meta}))
        assert info.value.reason == "bad header", (kind, meta)
    with pytest.raises(WireError) as info:
        _header(kind="gradient").meta_as(ActivationMeta)
    assert info.value.reason == "bad payload"


def test_framing_overhead_of_a_typical_message() -> None:
    b, t, k = 8, 128, 32  # subspace codec: coefficients, a scale per token, token ids
    packet = Packet(
        {
            "v": torch.randn(b, t, k).to(torch.bfloat16),
            "scale": torch.rand(b, t, 1).to(torch.bfloat16),
            "tokens": torch.randint(0, 50_000, (b, t)).to(torch.uint16),
        }
    )
    header = _header(meta=ActivationMeta(samples=b))
    data = encode(header, packet)
    overhead = framing_overhead(data)
    print(f"\nframing overhead: {overhead} bytes on {packet.nbytes} payload bytes")
    assert overhead == len(data) - packet.nbytes == framing_overhead(header, packet)
    assert overhead < 400
    grad = encode(
        _header(kind="gradient", meta=GradientMeta(loss=3.14159)), Packet({"v": torch.randn(b, t, k)})
    )
    assert framing_overhead(grad) < 400


def _spec(dtype: str, shape: list[int], name: str = "v") -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _one(dtype: str, shape: list[int], payload: bytes = b"") -> bytes:
    return _raw(_base(tensors=[_spec(dtype, shape)]), payload)


_DEFAULT = WireLimits()
CASES: list[tuple[str, bytes, WireLimits]] = [
    ("too short", b"\x05\x00", _DEFAULT),
    ("bad header length", struct.pack("<I", 100) + b"{}", _DEFAULT),
    ("bad header length", struct.pack("<I", 0) + b"{}", _DEFAULT),
    ("bad header length", _raw(_base(run="x" * 100)), WireLimits(max_header=64)),
    ("bad header", struct.pack("<I", 5) + b"{nope", _DEFAULT),
    ("bad header", struct.pack("<I", 4) + b"\xff\xfe\xfd\xfc", _DEFAULT),
    ("bad header", _raw({k: v for k, v in _base().items() if k != "stage"}), _DEFAULT),
    ("bad header", _raw(_base(extra=1)), _DEFAULT),
    ("bad header", _raw(_base(stage="3")), _DEFAULT),
    ("bad header", _raw(_base(stage=-1)), _DEFAULT),
    ("bad header", _raw(_base(kind="hello")), _DEFAULT),
    ("bad header", _raw(_base(micro_batch="m" * 129)), _DEFAULT),
    ("bad header", _raw(_base(meta={"x": [1]})), _DEFAULT),
    ("bad header", _raw(_base(meta={"samples": 1.5})), _DEFAULT),
    ("bad header", _raw(_base(kind="ack", meta={"samples": 2})), _DEFAULT),
    ("unknown dtype", _one("float64", [1], bytes(8)), _DEFAULT),
    ("unknown dtype", _one("bool", [1], bytes(1)), _DEFAULT),
    ("bad shape", _one("int8", [-1, 4]), _DEFAULT),
    ("bad shape", _one("int8", [1] * 9, b"\x00"), _DEFAULT),
    ("too large", _one("int64", [2**40, 2**40]), _DEFAULT),
    ("too large", _one("uint8", [600], bytes(600)), WireLimits(max_bytes=512)),
    ("too large", _one("uint8", [600]), WireLimits(max_bytes=512)),  # the spec alone is over the limit
    ("size mismatch", _one("int32", [4], bytes(15)), _DEFAULT),
    ("size mismatch", _one("int32", [4], bytes(17)), _DEFAULT),
    ("size mismatch", _raw(_base(), b"\x00"), _DEFAULT),
    (
        "too many tensors",
        _raw(_base(tensors=[_spec("uint8", [1], f"t{i}") for i in range(9)]), bytes(9)),
        _DEFAULT,
    ),
    ("duplicate tensor name", _raw(_base(tensors=[_spec("uint8", [1])] * 2), bytes(2)), _DEFAULT),
]


@pytest.mark.parametrize(
    ("reason", "data", "limits"), CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)]
)
def test_rejects(reason: str, data: bytes, limits: WireLimits) -> None:
    with pytest.raises(WireError) as info:
        decode(data, limits)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite(dtype: torch.dtype, bad: float) -> None:
    v = torch.zeros(3, 4, dtype=dtype)
    v[1, 2] = bad
    with pytest.raises(WireError) as info:
        decode(encode(_header(), Packet({"ok": torch.ones(2), "v": v})))
    assert info.value.reason == "non-finite"


def test_encode_refuses_unknown_dtypes() -> None:
    for dtype in (torch.float64, torch.bool, torch.complex64):
        with pytest.raises(WireError) as info:
            encode(_header(), Packet({"v": torch.zeros(2, dtype=dtype)}))
        assert info.value.reason == "unknown dtype"


def test_encode_takes_only_host_tensors() -> None:
    """A device tensor would make encode wait for the GPU on the event loop: refused, with the fix."""
    with pytest.raises(WireError, match="on_host"):
        encode(_header(), Packet({"v": torch.empty(2, device="meta")}))
    assert Packet({"v": torch.ones(2)}).on_host().tensors["v"].device.type == "cpu"
