"""The trainable parameter shapes of every stage, from the config alone (nothing allocated).

Replica sync prices a round by its tensors' shapes (pmnode.core.compress.round_bytes: top-k chunks
per tensor, PowerSGD factors per matrix, small tensors exact), so a parameter count is not enough.
The shapes follow pmnode.core.stages.Stage's construction; tests/test_plan.py checks them against a
built stage, and their sum against pmnode.core.sizing's count.
"""

from __future__ import annotations

from pmnode.config import RunConfig
from pmnode.config.split import split_layers
from pmnode.core.stages import free_layers

Shape = tuple[int, ...]


def _layer(cfg: RunConfig, rows: int) -> list[Shape]:
    """One block: its two norm gains, q k v, the attention write (rows x d), SwiGLU in and its write."""
    m = cfg.model
    hd = m.d_model // m.n_heads
    q, kv, d, h = m.n_heads * hd, m.kv_heads * hd, m.d_model, m.hidden
    return [(d,), (q, d), (kv, d), (kv, d), (rows, q), (d,), (h, d), (h, d), (rows, h)]


def stage_shapes(cfg: RunConfig) -> list[list[Shape]]:
    """Per stage, the shape of every trainable parameter (the order does not matter to the bytes)."""
    m, sub = cfg.model, cfg.subspace
    d, v = m.d_model, m.vocab_size
    k = cfg.rank if sub.enabled else d
    constrained = sub.enabled and sub.constrain == "layers"
    reparam = constrained and sub.mode == "reparam"
    cols = k if reparam else d  # an embedding's columns and a write's rows when reparametrised
    free = free_layers(cfg)
    ranges = split_layers(m.n_layers, cfg.n_stages, cfg.stage_layers)
    out: list[list[Shape]] = []
    for i, r in enumerate(ranges):
        shapes: list[Shape] = []
        if i == 0:
            shapes.append((v, cols))
        elif sub.enabled:  # a stage's own token, pair and longer n-gram tables
            if sub.stage_embeddings:
                shapes.append((v, cols))
            if sub.stage_bigrams:
                shapes += [(sub.stage_bigrams, cols)] * (sub.stage_ngrams - 1)
        for layer in r:
            shapes += _layer(cfg, d if layer in free or not reparam else k)
        if i == len(ranges) - 1:
            shapes += [(d,), (v, d)]
        out.append(shapes)
    return out
