"""A LLaMA-style decoder whose residual-stream writes can be confined to span(U).

Blocks are pre-norm: x = x + Wo·attn(norm(x)); x = x + W2·mlp(norm(x)).
The RMSNorm gains sit on branch *inputs*, which never touch the residual
stream, so they are free. The only residual writes are Wo, W2 and the
trainable token embedding E; those are `ResidualWrite`/`SubspaceEmbedding`
modules. Anything placed between a write and the residual add must map
span(U) into itself: a per-element trainable gain would not, so the optional
`branch_norm` is a parameter-free RMSNorm (a per-token scalar, which does).

Each parameter is initialised from a generator seeded by (seed, layer), so a
stage holding layers 3..5 has bit-for-bit the weights the unsplit model has.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pmnode.config import ModelConfig
from pmnode.core.subspace import Subspace

WriteMode = Literal["free", "projection", "reparam"]


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, name)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def normal_(t: Tensor, std: float, g: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, trainable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if trainable else None

    def forward(self, x: Tensor) -> Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


class ResidualWrite(nn.Module):
    """A bias-free linear map whose output is added to the residual stream.

    free:       y = W h                 W (d, n)
    projection: y = W h, W <- U U^T W   at init, after every step and load;
                the gradient is projected before the step too, so Adam's
                moments see only the part of the update that survives.
    reparam:    y = U (Z h)             Z (k, n) trainable; in span(U) by construction.
    """

    def __init__(self, n_in: int, d: int, mode: WriteMode, subspace: Subspace | None):
        super().__init__()
        if mode != "free" and subspace is None:
            raise ValueError(f"mode {mode!r} needs a subspace")
        self.mode, self.subspace = mode, subspace
        rows = subspace.rank if subspace is not None and mode == "reparam" else d
        self.weight = nn.Parameter(torch.empty(rows, n_in))

    @property
    def sub(self) -> Subspace:
        """The subspace, which every mode but "free" has (checked when built)."""
        assert self.subspace is not None
        return self.subspace

    def reset(self, std: float, g: torch.Generator) -> None:
        full = torch.empty(
            self.subspace.d_model if self.subspace else self.weight.shape[0], self.weight.shape[1]
        )
        normal_(full, std, g)
        with torch.no_grad():
            if self.mode == "reparam":
                # Z = U^T W0: the same function at init as projecting W0.
                self.weight.copy_(self.sub.basis.T @ full)
            else:
                self.weight.copy_(full)
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        if self.mode == "projection":
            self.weight.copy_(self.sub.project_columns(self.weight))

    @torch.no_grad()
    def project_grad_(self) -> None:
        if self.mode == "projection" and self.weight.grad is not None:
            self.weight.grad.copy_(self.sub.project_columns(self.weight.grad))

    def effective_weight(self) -> Tensor:
        if self.mode == "reparam":
            return self.sub.basis @ self.weight  # (d, k)(k, n)
        return self.weight

    def forward(self, h: Tensor) -> Tensor:
        if self.mode == "reparam":
            return F.linear(h, self.weight) @ self.sub.basis.T
        return F.linear(h, self.weight)


class SubspaceEmbedding(nn.Module):
    """x0 = F[tok] + E[tok] with E's rows in span(U); without a subspace, x0 = E[tok].

    with_table=False leaves F out: a stage's own token embedding, added to the stream it receives.
    """

    def __init__(
        self, vocab: int, d: int, mode: WriteMode, subspace: Subspace | None, with_table: bool = True
    ):
        super().__init__()
        self.mode, self.subspace, self.with_table = mode, subspace, with_table
        cols = subspace.rank if subspace is not None and mode == "reparam" else d
        self.weight = nn.Parameter(torch.empty(vocab, cols))

    @property
    def sub(self) -> Subspace:
        """The subspace, which every mode but "free" has (checked when built)."""
        assert self.subspace is not None
        return self.subspace

    def reset(self, std: float, g: torch.Generator) -> None:
        full = torch.empty(
            self.weight.shape[0], self.subspace.d_model if self.subspace else self.weight.shape[1]
        )
        normal_(full, std, g)
        with torch.no_grad():
            self.weight.copy_(full @ self.sub.basis if self.mode == "reparam" else full)
        self.project_()

    @torch.no_grad()
    def project_(self) -> None:
        if self.mode == "projection":
            self.weight.copy_(self.sub.project_rows(self.weight))

    @torch.no_grad()
    def project_grad_(self) -> None:
        if self.mode == "projection" and self.weight.grad is not None:
            self.weight.grad.copy_(self.sub.project_rows(self.weight.grad))

    def forward(self, tokens: Tensor) -> Tensor:
        e = F.embedding(tokens, self.weight)  # (B, T, d) or (B, T, k)
        if self.mode == "reparam":
            e = e @ self.sub.basis.T
        if self.subspace is not None and self.with_table:
            e = e + self.subspace.table[tokens]
        return e


def bigram_ids(tokens: Tensor, vocab: int, buckets: int) -> Tensor:
    """(B, T) token ids -> (B, T) hashed ids of (previous, current) pairs; position 0 pairs with a
    start marker (id `vocab`), so the ids depend on the window alone."""
    return ngram_ids(tokens, vocab, buckets, 2)


_HASH_PRIME = 2**31 - 1


def ngram_ids(tokens: Tensor, vocab: int, buckets: int, n: int) -> Tensor:
    """(B, T) token ids -> (B, T) hashed ids of the n tokens ending at each position; positions
    before the window's start are the start marker (id `vocab`)."""
    pad = torch.full_like(tokens[:, : n - 1], vocab)
    padded = torch.cat([pad, tokens], dim=1)
    t = tokens.shape[1]
    h = padded[:, :t]
    for j in range(1, n):  # fold the next token in; reduced first so nothing overflows int64
        h = (h % _HASH_PRIME) * 1_000_003 + padded[:, j : j + t]
    return h % buckets


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (L, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, nh, T, hd) rotated pairwise by position."""
    t = x.shape[-2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hd/2)
    c, s = cos[:t], sin[:t]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: WriteMode, subspace: Subspace | None):
        super().__init__()
        self.nh, self.nkv = cfg.n_heads, cfg.kv_heads
        self.hd = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, self.nh * self.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.nkv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.nkv * self.hd, bias=False)
        self.wo = ResidualWrite(self.nh * self.hd, cfg.d_model, mode, subspace)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(b, t, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))  # (B, T, d)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: WriteMode, subspace: Subspace | None):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w2 = ResidualWrite(cfg.hidden, cfg.d_model, mode, subspace)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mode: WriteMode, subspace: Subspace | None, branch_norm: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, mode, subspace)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mode, subspace)
        # Parameter-free: a per-token scalar keeps a write inside span(U).
        self.out_norm = RMSNorm(cfg.d_model, cfg.norm_eps, trainable=False) if branch_norm else nn.Identity()

    def reset(self, cfg: ModelConfig, g: torch.Generator) -> None:
        # GPT-2 style: residual writes get a smaller std, scaled with depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for lin in (self.attn.wq, self.attn.wk, self.attn.wv, self.mlp.w1, self.mlp.w3):
            normal_(lin.weight, cfg.init_std, g)
        self.attn.wo.reset(out_std, g)
        self.mlp.w2.reset(out_std, g)

    def writes(self) -> tuple[ResidualWrite, ResidualWrite]:
        return self.attn.wo, self.mlp.w2

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.out_norm(self.attn(self.attn_norm(x), cos, sin))
        return x + self.out_norm(self.mlp(self.mlp_norm(x)))
