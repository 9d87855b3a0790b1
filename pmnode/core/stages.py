"""Pipeline stages: the stage module built from (config, index) alone (the pure split: config.split)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pmnode.config import RunConfig
from pmnode.config.split import free_layer_range, split_layers
from pmnode.core.model import (
    Block,
    ResidualWrite,
    RMSNorm,
    SubspaceEmbedding,
    WriteMode,
    bigram_ids,
    ngram_ids,
    normal_,
    rope_tables,
    seeded_generator,
)
from pmnode.core.subspace import Subspace
from pmnode.errors import ConfigError


def free_layers(cfg: RunConfig) -> range:
    """Global ids of the unconstrained tail layers; they must all sit in the last stage."""
    sub, m = cfg.subspace, cfg.model
    return free_layer_range(
        m.n_layers,
        cfg.n_stages,
        cfg.stage_layers,
        sub.uncompressed_tail_layers,
        sub.enabled and sub.constrain == "layers",
    )


def build_subspace(cfg: RunConfig) -> Subspace | None:
    if not cfg.subspace.enabled:
        return None
    return Subspace(
        seed=cfg.subspace.seed,
        d_model=cfg.model.d_model,
        rank=cfg.rank,
        vocab_size=cfg.model.vocab_size,
        table_scale=cfg.subspace.token_table_scale,
    )


class Stage(nn.Module):
    """Layers [a, b) of the model; the head adds the embedding, the tail the norm and LM head.

    forward(x, tokens): head ignores x and embeds tokens; the tail returns logits (B, T, V),
    every other stage the residual stream (B, T, d).
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, cfg: RunConfig, index: int, subspace: Subspace | None = None):
        super().__init__()
        ranges = split_layers(cfg.model.n_layers, cfg.n_stages, cfg.stage_layers)
        if not 0 <= index < len(ranges):
            raise ConfigError(f"stage {index} is out of range: this run has stages 0..{len(ranges) - 1}")
        if cfg.subspace.enabled and subspace is None:
            subspace = build_subspace(cfg)
        self.cfg, self.index, self.layer_range = cfg, index, ranges[index]
        self.is_first, self.is_last = index == 0, index == len(ranges) - 1
        m = cfg.model
        sub = cfg.subspace
        constrained: WriteMode = sub.mode if sub.enabled and sub.constrain == "layers" else "free"
        free = free_layers(cfg)
        self.subspace = subspace
        if self.is_first:
            self.embed = SubspaceEmbedding(m.vocab_size, m.d_model, constrained, subspace)
        local = sub.enabled and not self.is_first  # stages after the head may embed token ids
        self.reembed = (
            SubspaceEmbedding(m.vocab_size, m.d_model, constrained, subspace, with_table=False)
            if local and sub.stage_embeddings
            else None
        )
        # Pair and triple tables stand without the token table: at a 128K vocabulary vocab x d per
        # stage would not fit, hashed n-grams do.
        self.bigrams = (
            SubspaceEmbedding(sub.stage_bigrams, m.d_model, constrained, subspace, with_table=False)
            if local and sub.stage_bigrams
            else None
        )
        longer = range(3, sub.stage_ngrams + 1) if self.bigrams is not None else range(0)
        self.ngrams = nn.ModuleList(
            SubspaceEmbedding(sub.stage_bigrams, m.d_model, constrained, subspace, with_table=False)
            for _ in longer
        )
        self.layers = nn.ModuleDict(
            {
                str(i): Block(
                    m,
                    "free" if i in free else constrained,
                    subspace,
                    cfg.subspace.enabled and cfg.subspace.branch_norm,
                )
                for i in self.layer_range
            }
        )
        if self.is_last:
            self.norm = RMSNorm(m.d_model, m.norm_eps)
            self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        cos, sin = rope_tables(m.d_model // m.n_heads, m.max_seq_len, m.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.checkpoint_layers = False  # a machine's choice: recompute each block in the backward
        self.reset()

    def reset(self) -> None:
        """Initialise from (train.seed, layer name) only, so any split gives the same weights."""
        seed, m = self.cfg.train.seed, self.cfg.model
        if self.is_first:
            self.embed.reset(m.init_std, seeded_generator(seed, "embed"))
        else:  # the stage's own tables start at zero: the stage starts as the model without them
            for table in (self.reembed, self.bigrams, *self.ngrams):
                if table is not None:
                    nn.init.zeros_(table.weight)
        for i, block in self.blocks():
            block.reset(m, seeded_generator(seed, f"layer{i}"))
        if self.is_last:
            normal_(self.lm_head.weight, m.init_std, seeded_generator(seed, "lm_head"))

    def blocks(self) -> list[tuple[int, Block]]:
        """The stage's layers with their index in the model (typed: a ModuleDict yields Modules)."""
        return [(int(i), cast(Block, b)) for i, b in self.layers.items()]

    def ngram_tables(self) -> list[SubspaceEmbedding]:
        return [cast(SubspaceEmbedding, t) for t in self.ngrams]

    def writes(self) -> list[ResidualWrite | SubspaceEmbedding]:
        """Every module that writes into the residual stream."""
        out: list[ResidualWrite | SubspaceEmbedding] = [self.embed] if self.is_first else []
        out.extend(e for e in (self.reembed, self.bigrams, *self.ngrams) if e is not None)
        for _, block in self.blocks():
            out.extend(block.writes())
        return out

    def project_(self) -> None:
        """Re-impose the subspace invariant on every constrained write (after a step or a load)."""
        for w in self.writes():
            w.project_()

    def project_grads_(self) -> None:
        """Drop the gradient part the post-step projection would discard anyway (projection mode)."""
        for w in self.writes():
            w.project_grad_()

    def add_token_features(self, x: Tensor, tokens: Tensor | None) -> Tensor:
        """The stage's own token (and token n-gram) embeddings, added to the stream it received."""
        if self.reembed is None and self.bigrams is None:
            return x
        if tokens is None:
            raise ValueError(f"stage {self.index} adds its token embedding: it needs token ids")
        if self.reembed is not None:
            x = x + self.reembed(tokens)
        if self.bigrams is not None:
            ids = bigram_ids(tokens, self.cfg.model.vocab_size, self.bigrams.weight.shape[0])
            x = x + self.bigrams(ids)
        for n, table in enumerate(self.ngram_tables(), start=3):
            x = x + table(ngram_ids(tokens, self.cfg.model.vocab_size, table.weight.shape[0], n))
        return x

    def forward(self, x: Tensor | None, tokens: Tensor | None = None) -> Tensor:
        if self.is_first:
            if tokens is None:
                raise ValueError("the head stage embeds token ids")
            x = self.embed(tokens)  # (B, T, d)
        if x is None:
            raise ValueError(f"stage {self.index} needs the residual stream from upstream")
        x = self.add_token_features(x, tokens)
        for block in self.layers.values():
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(block, x, self.cos, self.sin, use_reentrant=False)
            else:
                x = block(x, self.cos, self.sin)
        if self.is_last:
            return self.lm_head(self.norm(x))  # (B, T, V)
        return x
