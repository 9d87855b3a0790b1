"""Every codec round-trips and costs exactly what its formula says (test e)."""

from __future__ import annotations

import pytest
import torch
from roundtrip import roundtrip

from pmnode.core.codecs import make_codec, token_dtype
from pmnode.core.subspace import Subspace
from pmnode.errors import ConfigError

D, K, V = 64, 8, 256
B, T = 3, 5


@pytest.fixture(scope="module")
def sub() -> Subspace:
    return Subspace(seed=3, d_model=D, rank=K, vocab_size=V)


def on_span(sub: Subspace, tokens: torch.Tensor) -> torch.Tensor:
    c = torch.randn(B, T, K, generator=torch.Generator().manual_seed(1))
    return sub.decode(c, tokens)


TOK = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


# spec -> (forward bytes per token, backward bytes per token, max relative round-trip error)
CASES = {
    "dense": (4 * D, 4 * D, 0.0),
    "dense:bf16": (2 * D, 2 * D, 8e-3),
    "int8": (D + 2, D + 2, 2e-2),
    "topk:16": (16 * 3, 16 * 3, None),
    "subspace": (4 * K + 1, 4 * K, 1e-6),
    "subspace:fp16": (2 * K + 1, 2 * K, 1e-3),
    "subspace:bf16": (2 * K + 1, 2 * K, 8e-3),
    "subspace:int8": (K + 2 + 1, K + 2, 2e-2),
    "subspace:int4": (K // 2 + 2 + 1, K // 2 + 2, 0.2),
}


@pytest.mark.parametrize("spec", list(CASES))
def test_roundtrip_and_bytes(spec: str, sub: Subspace) -> None:
    fwd_b, bwd_b, tol = CASES[spec]
    codec = make_codec(spec, d_model=D, vocab_size=V, subspace=sub if spec.startswith("subspace") else None)
    x = on_span(sub, TOK) if spec.startswith("subspace") else torch.randn(B, T, D)
    z = codec.project(x, TOK)
    p = codec.pack_activation(z, TOK)
    assert p.nbytes == B * T * fwd_b == B * T * codec.bytes_per_token_forward()
    back = codec.lift(codec.unpack_activation(p), TOK)
    g = torch.randn_like(z)
    gp = codec.pack_gradient(g)
    assert gp.nbytes == B * T * bwd_b == B * T * codec.bytes_per_token_backward()
    g_back = codec.unpack_gradient(gp)
    if tol is None:  # topk keeps exactly the largest entries and zeroes the rest
        kept = z.abs().topk(16, dim=-1).indices
        expect = torch.zeros_like(z).scatter(-1, kept, z.gather(-1, kept).bfloat16().float())
        assert torch.equal(back, expect)
        assert (g_back != 0).sum(-1).max().item() == 16
    else:
        err = (back - x).norm() / x.norm()
        assert err <= max(tol, 1e-7), err
        assert (g_back - g).norm() / g.norm() <= max(tol, 1e-7)
    if "tokens" in p.tensors:
        assert p.tensors["tokens"].dtype == torch.uint8 and torch.equal(p.tensors["tokens"].long(), TOK)


def test_int8_handles_zero_and_tiny_gradients() -> None:
    codec = make_codec("int8", d_model=D, vocab_size=V)
    g = torch.zeros(B, T, D)
    g[0, 0] = 1e-9 * torch.linspace(-1, 1, D)  # activation gradients can be this small
    back = codec.unpack_gradient(codec.pack_gradient(g))
    assert torch.equal(back[1:], g[1:])
    assert ((back[0, 0] - g[0, 0]).abs().max() / 1e-9).item() < 1e-2


def test_roundtrip_gradient_is_the_compressed_one(sub: Subspace) -> None:
    """In-process boundary: the gradient that reaches upstream is U (unpack(pack(U^T g)))."""
    codec = make_codec("subspace:int8", d_model=D, vocab_size=V, subspace=sub)
    x = on_span(sub, TOK).requires_grad_()
    g = torch.randn(B, T, D)
    roundtrip(codec, x, TOK).backward(g)
    expect = codec.unpack_gradient(codec.pack_gradient(g @ sub.basis)) @ sub.basis.T
    assert torch.allclose(x.grad, expect, atol=1e-6)


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(256, torch.uint8), (257, torch.uint16), (50257, torch.uint16), (70000, torch.int32)]
)
def test_token_dtype_is_smallest(vocab: int, dtype: torch.dtype) -> None:
    assert token_dtype(vocab) == dtype


def test_bad_specs(sub: Subspace) -> None:
    with pytest.raises(ConfigError, match="unknown codec"):
        make_codec("gzip", d_model=D, vocab_size=V)
    with pytest.raises(ConfigError, match=r"subspace\.enabled"):
        make_codec("subspace", d_model=D, vocab_size=V)
    with pytest.raises(ConfigError, match="enabled: false"):
        make_codec("dense", d_model=D, vocab_size=V, subspace=sub)
    with pytest.raises(ConfigError, match="topk count"):
        make_codec("topk:999", d_model=D, vocab_size=V)


def test_int4_packs_two_levels_per_byte_exactly() -> None:
    from pmnode.core.codecs import Int4Q

    q = Int4Q(5)  # odd: the last byte carries one level and a pad
    z = torch.tensor([[7.0, -7.0, 0.0, 3.0, -1.0], [0.0] * 5])
    p = q.pack(z)
    assert p["q"].dtype == torch.uint8 and p["q"].shape == (2, 3) and q.bytes_per_token() == 3 + 2
    # levels + 8, low nibble first: (15, 1) (8, 11) (7, pad 8)
    assert p["q"][0].tolist() == [15 | 1 << 4, 8 | 11 << 4, 7 | 8 << 4]
    assert torch.equal(q.unpack(p), z)  # scale 1: every value is a level
