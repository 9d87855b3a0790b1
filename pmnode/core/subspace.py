"""The Protocol Models subspace (arXiv 2506.01260), in one place.

Notation (shapes in comments): d = d_model, k = compression rank, V = vocab.
    U : (d, k)  orthonormal columns, U^T U = I_k           -- fixed, from the seed
    F : (V, d)  frozen full-rank token table               -- fixed, from the seed
Every trainable write into the residual stream lies in span(U), so at any
stage boundary the residual x satisfies  x - F[tok] = U c  for some c in R^k:
    encode:  c = U^T (x - F[tok])        (B, T, k)
    decode:  x = U c + F[tok]            (B, T, d)
The backward pass needs nothing extra: dL/dc = U^T dL/dx is what autograd
produces for the decode above.

U and F are generated on the CPU in float64 and rounded to float32, so the
same seed gives the same bytes on every machine; `fingerprint` hashes them so
that peers can prove they hold the same basis.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

_F_STREAM = 0x5EED_F00D  # keeps F's random stream apart from U's for the same seed


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def make_basis(seed: int, d: int, k: int) -> Tensor:
    """U: (d, k) float32 with orthonormal columns, a pure function of (seed, d, k)."""
    g = _generator(seed)
    a = torch.randn(d, k, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # (d, k), (k, k)
    # QR is unique only up to column signs; fix them so every LAPACK agrees.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32).contiguous()


def make_token_table(seed: int, vocab: int, d: int, scale: float = 1.0) -> Tensor:
    """F: (vocab, d) float32 ~ N(0, scale^2), frozen. Full rank with probability one."""
    g = _generator(seed ^ _F_STREAM)
    f = torch.randn(vocab, d, generator=g, dtype=torch.float64) * scale
    return f.to(torch.float32).contiguous()


def fingerprint(basis: Tensor, table: Tensor) -> str:
    """sha256 over the shapes and float32 bytes of U and F; 16 hex chars are plenty."""
    h = hashlib.sha256()
    for t in (basis, table):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class Subspace(nn.Module):
    """Holds U and F as non-persistent buffers: they are derived, never checkpointed."""

    basis: Tensor
    table: Tensor

    def __init__(self, *, seed: int, d_model: int, rank: int, vocab_size: int, table_scale: float = 1.0):
        super().__init__()
        self.seed, self.d_model, self.rank, self.vocab_size = seed, d_model, rank, vocab_size
        self.register_buffer("basis", make_basis(seed, d_model, rank), persistent=False)
        self.register_buffer(
            "table", make_token_table(seed, vocab_size, d_model, table_scale), persistent=False
        )
        self._fingerprint = fingerprint(self.basis, self.table)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, x: Tensor, tokens: Tensor) -> Tensor:
        """(B, T, d), (B, T) -> c (B, T, k)."""
        return (x - self.table[tokens]) @ self.basis

    def decode(self, c: Tensor, tokens: Tensor) -> Tensor:
        """(B, T, k), (B, T) -> x (B, T, d)."""
        return c @ self.basis.T + self.table[tokens]

    def project_columns(self, w: Tensor) -> Tensor:
        """W (d, n) -> U U^T W: keeps a linear layer's output (its weight's rows axis) in span(U)."""
        return self.basis @ (self.basis.T @ w)

    def project_rows(self, e: Tensor) -> Tensor:
        """E (n, d) -> E U U^T: keeps embedding rows in span(U)."""
        return (e @ self.basis) @ self.basis.T

    def residual_error(self, x: Tensor, tokens: Tensor) -> Tensor:
        """Relative norm of the part of x - F[tok] outside span(U); 0 when the invariant holds."""
        r = x - self.table[tokens]
        off = r - (r @ self.basis) @ self.basis.T
        return off.norm() / r.norm().clamp_min(1e-30)
