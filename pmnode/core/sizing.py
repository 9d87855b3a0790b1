"""What one stage of a run costs, from its config alone: parameters, memory, FLOPs and wire bytes.

Nothing is built: counts follow the model's construction (pmnode.core.model/stages), so
`coordinator inspect` can size a Llama-8B run on a laptop and `pmnode join` can refuse a stage that
will not fit before allocating it. tests/test_sizing.py checks the counts against built stages.

    stage_sizes(cfg) -> [StageSize]   per stage: layers, parameters, memory per precision, FLOPs, bytes
    StageSize.required(precision, checkpointed)   bytes a device needs for this stage, with headroom

Memory is weights + gradients + optimizer state + the frozen U and F + the activations one
micro-batch keeps for its backward (an estimate: see `_layer_activation_elems`; the measured peak
of each option is in docs/benchmarks/memory/).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel

from pmnode.config import RunConfig
from pmnode.config.split import split_layers
from pmnode.core.codecs import wire_bytes
from pmnode.errors import ConfigError

PrecisionName = Literal["fp32", "bf16", "int8-adam", "bf16+int8-adam"]
HEADROOM = 1.10  # allocator fragmentation, the CUDA context, temporaries of the optimizer step
INT8_BLOCK = 256  # pmnode.core.adam8: one fp32 scale per block of 256 moments
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class Precision(BaseModel):
    """Bytes per trainable parameter (weights, gradients, optimizer state) and per activation."""

    name: PrecisionName
    weights: float
    grads: float
    optimizer: float
    activation: int
    cast_copy: float  # autocast keeps a bf16 copy of every weight for the step's forward and backward


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision(name="fp32", weights=4, grads=4, optimizer=8, activation=4, cast_copy=0),
        Precision(name="bf16", weights=4, grads=4, optimizer=8, activation=2, cast_copy=2),
        Precision(
            name="int8-adam", weights=4, grads=4, optimizer=2 + 8 / INT8_BLOCK, activation=4, cast_copy=0
        ),
        Precision(
            name="bf16+int8-adam", weights=4, grads=4, optimizer=2 + 8 / INT8_BLOCK, activation=2, cast_copy=2
        ),
    )
}


def precision_name(autocast_bf16: bool, optimizer_state: str) -> PrecisionName:
    """The precision option a machine's choices (MachineConfig) amount to."""
    int8 = optimizer_state == "int8"
    if autocast_bf16:
        return "bf16+int8-adam" if int8 else "bf16"
    return "int8-adam" if int8 else "fp32"


class Memory(BaseModel):
    """Bytes of one stage under one precision option."""

    precision: PrecisionName
    weights: int
    grads: int
    optimizer: int
    frozen: int  # U and F, fp32 on every stage
    activations: int  # one micro-batch, every layer's saved tensors
    activations_checkpointed: int  # one micro-batch with per-layer activation checkpointing
    total: int
    total_checkpointed: int


class StageSize(BaseModel):
    stage: int
    layers: tuple[int, int]  # [start, stop)
    params_trainable: int
    params_writes: int  # the residual writes among them: k x n each when reparametrised
    params_frozen: int  # U (d x k) and F (vocab x d)
    flops_per_token_fwd: int
    flops_per_token_bwd: int
    bytes_per_token_fwd: int  # the boundary after this stage (0 for the tail)
    bytes_per_token_bwd: int
    memory: list[Memory]

    def memory_for(self, precision: str) -> Memory:
        return next(m for m in self.memory if m.precision == precision)

    def required(self, precision: str = "fp32", checkpointed: bool = False) -> int:
        m = self.memory_for(precision)
        return math.ceil((m.total_checkpointed if checkpointed else m.total) * HEADROOM)


def boundary_bytes(cfg: RunConfig) -> tuple[int, int]:
    """Bytes per token a boundary carries forward and backward, by the codec's own formats."""
    m = cfg.model
    rank = cfg.rank if cfg.subspace.enabled else None
    return wire_bytes(cfg.codec_spec, d_model=m.d_model, vocab_size=m.vocab_size, rank=rank)


def _layer_activation_elems(cfg: RunConfig) -> int:
    """Elements per token one block saves for its backward: norm inputs and outputs (4d), q, k, v
    and their RoPE'd copies (2d + 3 kv), the attention output and its write (2d), the MLP's four
    hidden tensors (4h), the MLP write (d) and the branch norms (2d): about 11d + 3kv + 4h."""
    m = cfg.model
    kv = m.kv_heads * (m.d_model // m.n_heads)
    return 11 * m.d_model + 3 * kv + 4 * m.hidden + m.n_heads


def stage_sizes(cfg: RunConfig, codec: str | None = None) -> list[StageSize]:
    """One StageSize per stage of `cfg` (see the module's docstring); `codec` replaces cfg's."""
    if codec is not None:
        cfg = cfg.with_overrides(codec=codec)
    m, sub = cfg.model, cfg.subspace
    d, h, v = m.d_model, m.hidden, m.vocab_size
    kv = m.kv_heads * (d // m.n_heads)
    k = cfg.rank if sub.enabled else d
    constrained = sub.enabled and sub.constrain == "layers"
    reparam = constrained and sub.mode == "reparam"
    ranges = split_layers(m.n_layers, cfg.n_stages, cfg.stage_layers)
    free = range(m.n_layers - sub.uncompressed_tail_layers, m.n_layers) if constrained else range(0)
    fwd_bytes, bwd_bytes = boundary_bytes(cfg)
    tokens = cfg.train.micro * cfg.train.seq_len
    layer_act = _layer_activation_elems(cfg)
    frozen = d * k + v * d if sub.enabled else 0
    out = []
    for i, r in enumerate(ranges):
        head, tail = i == 0, i == len(ranges) - 1
        rows = k if reparam else d  # a write's rows: k x n when reparametrised, d x n otherwise
        params = writes = flops = 0
        for layer in r:
            w_rows = d if layer in free else rows
            lw = w_rows * d + w_rows * h  # wo (rows x d), w2 (rows x h)
            params += 2 * d + d * d + 2 * d * kv + 2 * d * h + lw
            writes += lw
            flops += 2 * (d * d + 2 * d * kv + 2 * d * h + lw) + 2 * cfg.train.seq_len * d
            if w_rows == k and reparam:
                flops += 2 * 2 * k * d  # the writes' U-products, (k -> d), twice per layer
        emb_cols = k if reparam else d
        if head:
            params += v * emb_cols
            writes += v * emb_cols
            flops += 2 * k * d if reparam else 0
        elif sub.enabled and (sub.stage_embeddings or sub.stage_bigrams):
            ngrams = sub.stage_bigrams * (sub.stage_ngrams - 1)
            extra = (v * sub.stage_embeddings + ngrams) * emb_cols
            params, writes = params + extra, writes + extra
        if tail:
            params += d + v * d
            flops += 2 * d * v
        if sub.enabled:
            flops += 2 * d * k * ((not head) + (not tail))  # the codec: lift in, project out
        acts = tokens * layer_act * len(r)  # elements
        act_ckpt = tokens * (d * len(r) + layer_act)  # block inputs, and one block recomputed
        logits = tokens * 2 * v * 4 if tail else 0  # fp32 logits and the loss's softmax, any precision
        mems = []
        for p in PRECISIONS.values():
            a, ac = acts * p.activation + logits, act_ckpt * p.activation + logits
            w, g, o = round(params * p.weights), round(params * p.grads), round(params * p.optimizer)
            fixed = w + g + o + 4 * frozen + round(params * p.cast_copy)
            mems.append(
                Memory(
                    precision=p.name,
                    weights=w,
                    grads=g,
                    optimizer=o,
                    frozen=4 * frozen,
                    activations=a,
                    activations_checkpointed=ac,
                    total=fixed + a,
                    total_checkpointed=fixed + ac,
                )
            )
        out.append(
            StageSize(
                stage=i,
                layers=(r.start, r.stop),
                params_trainable=params,
                params_writes=writes,
                params_frozen=frozen,
                flops_per_token_fwd=flops,
                flops_per_token_bwd=2 * flops,
                bytes_per_token_fwd=0 if tail else fwd_bytes,
                bytes_per_token_bwd=0 if tail else bwd_bytes,
                memory=mems,
            )
        )
    return out


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '512mb', '1e9' -> bytes; ConfigError with what to write otherwise."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a memory size: write e.g. 24GB, 24GiB or 512MB")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def human(n: float) -> str:
    """Bytes, as GiB/MiB with one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
