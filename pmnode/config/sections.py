"""The run config's sections: the model, its compression, the optimizer, the data, the training
loop, the swarm, and what one machine chooses for itself. Unknown keys are an error, so a typo in
a config file fails loudly instead of silently training the wrong model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pmnode.config.presets import PRESET_RATIO, PRESETS
from pmnode.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, optional grouped-query attention."""

    vocab_size: int = Field(
        256,
        ge=2,
        description="Vocabulary size; must cover the tokenizer. Unset: the tokenizer's (bytes: 256).",
    )
    d_model: int = Field(128, ge=8, description="Residual stream width d.")
    n_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention query heads.")
    n_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; None means n_heads."
    )
    ffn_hidden: int | None = Field(
        None, ge=1, description="SwiGLU hidden width; None means the LLaMA rule round(8d/3, 32)."
    )
    max_seq_len: int = Field(256, ge=2, description="Longest sequence RoPE tables are built for.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of linear layers.")

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model/n_heads must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return max(32, round(8 * self.d_model / 3 / 32) * 32)


class SubspaceConfig(_Strict):
    """The Protocol Models subspace: basis U (d x k) and frozen token table F (vocab x d)."""

    enabled: bool = Field(
        True, description="Constrain residual writes to span(U); False trains a plain model."
    )
    preset: Literal["remedy", "paper"] = Field(
        "remedy",
        description="Defaults for constrain, the stage tables, the codec's precision and k when the "
        "config leaves them unset. remedy (measured best, docs/benchmarks/fidelity): constrain boundaries,"
        " stage_embeddings, stage_bigrams 4096, stage_ngrams 3, codec subspace:int8, k = d/8. paper (arXiv"
        " 2506.01260): constrain layers, no tables, codec subspace (fp32), k = d/16.",
    )
    seed: int = Field(
        1234, ge=0, description="The one integer U and F are derived from; held by the coordinator."
    )
    compression_rank: int | None = Field(None, ge=1, description="k, the number of coefficients per token.")
    compression_ratio: float | None = Field(
        None, gt=1, description="Alternative to compression_rank: k = round(d_model / ratio)."
    )
    mode: Literal["projection", "reparam"] = Field(
        "reparam",
        description="projection: W <- U(U^T W) after each step; reparam: W = U Z with Z trainable "
        "(the default: it trained better in docs/benchmarks/subspace-sweep).",
    )
    token_table_scale: float = Field(1.0, gt=0, description="Std of the frozen token table F.")
    branch_norm: bool = Field(
        True,
        description="Parameter-free RMSNorm on each constrained branch output, so writes match F's scale "
        "(a per-token scalar keeps them in span(U)).",
    )
    uncompressed_tail_layers: int = Field(
        2, ge=0, description="Last layers of the tail left unconstrained (no boundary follows them)."
    )
    stage_embeddings: bool = Field(
        False,
        description="Unset: the preset's. Every stage after the head adds a trainable token embedding "
        "(zero at init) to the stream it receives: token features it would otherwise need from the k "
        "coefficients. Costs vocab x k (layers) or vocab x d (boundaries) parameters per stage, no bytes "
        "on the wire.",
    )
    stage_bigrams: int = Field(
        0,
        ge=0,
        description="Unset: the preset's. Every stage after the head adds a trainable embedding of each "
        "(previous, current) token pair, hashed into this many rows (0: none), with or without "
        "stage_embeddings (without it for large vocabularies, where vocab x d per stage would not fit). "
        "Every stage has the token ids, so local context costs no bytes on the wire.",
    )
    stage_ngrams: int = Field(
        2,
        ge=2,
        le=4,
        description="Unset: the preset's. With stage_bigrams: the longest run of tokens a stage embeds. "
        "2: pairs only; 3 and 4 add hashed tables (stage_bigrams rows each) of the last 3 and 4 tokens: "
        "more local context computed from the ids every stage has, no bytes on the wire.",
    )
    constrain: Literal["layers", "boundaries"] = Field(
        "layers",
        description="Unset: the preset's. layers: every residual write of a constrained layer lies in "
        "span(U), so the stream is F[tok] + span(U) between all layers (the paper's); boundaries: layers "
        "write at full width and the stream is projected onto F[tok] + span(U) only where a stage ends "
        "(the codec's encode is that projection), so the layers inside a stage keep their width. Both send"
        " k numbers per token.",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        """Fill what the config leaves unset from its preset (an unknown preset fails on the field)."""
        if isinstance(data, dict):
            preset = data.get("preset", "remedy")
            data = {**PRESETS.get(preset, {}), **data}
        return data

    @model_validator(mode="after")
    def _one_rank(self) -> SubspaceConfig:
        if self.compression_rank is not None and self.compression_ratio is not None:
            raise ValueError("set compression_rank or compression_ratio, not both")
        return self

    def rank(self, d_model: int) -> int:
        if self.compression_rank is not None:
            k = self.compression_rank
        elif self.compression_ratio is not None:
            k = max(1, round(d_model / self.compression_ratio))
        else:
            k = max(1, d_model // PRESET_RATIO[self.preset])
        if k > d_model:
            raise ConfigError(f"subspace.compression_rank={k} exceeds d_model={d_model}")
        return k


class OptimConfig(_Strict):
    """AdamW per stage, with linear warmup then cosine decay to min_lr_ratio * lr at train.steps."""

    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global grad-norm clip per stage; None disables.")
    write_lr_scale: float = Field(
        1.0,
        gt=0,
        description="Multiplier on the learning rate of the reparametrised residual writes Z (W = U Z): "
        "an Adam step moves Z's k rows, so the write's update is sqrt(k/d) of a full-width one.",
    )


class DataConfig(_Strict):
    """Training corpus and tokenizer; only the head stage of a swarm reads data."""

    source: str = Field(
        "stdlib",
        description="A directory made by `pmnode data prepare`; or 'stdlib' (the Python standard library's "
        "source, no download) or a file/directory of text, prepared into the cache on first use.",
    )
    tokenizer: str = Field(
        "byte",
        description="How a source that is not prepared yet is tokenized: 'byte', 'bpe:N' (a byte-level BPE "
        "of N tokens trained on it) or a path to a tokenizers tokenizer.json.",
    )
    heldout_fraction: float = Field(
        0.05, gt=0, lt=1, description="Fraction of documents held out when a source is prepared on first use."
    )
    max_bytes: int | None = Field(
        None,
        ge=1,
        description="Read only the first this many tokens of each split (bytes, with the byte tokenizer), "
        "for quick runs.",
    )
    manifest_sha256: str | None = Field(
        None, description="The prepared data's hash (its manifest's data_sha256); None: not pinned."
    )
    tokenizer_sha256: str | None = Field(None, description="The tokenizer's sha256; None: not pinned.")


class TrainConfig(_Strict):
    """Optimizer steps, batch and sequence shapes, seeds and evaluation cadence."""

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per micro-batch; None means the whole batch."
    )
    seq_len: int = Field(128, ge=2, description="Tokens per sequence.")
    seed: int = Field(0, ge=0, description="Seed for weight init and data order.")
    eval_every: int = Field(100, ge=1, description="Evaluate held-out loss every N steps.")
    eval_batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")

    @model_validator(mode="after")
    def _micro(self) -> TrainConfig:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


class SwarmConfig(_Strict):
    """How a swarm runs the pipeline; single-process training ignores it."""

    schedule: Literal["sync", "async"] = Field(
        "sync",
        description="sync flushes the pipeline before every step (equals pmnode train); async overlaps.",
    )
    heads: int = Field(
        1,
        ge=1,
        le=64,
        description="Head slots: stage-0 nodes that drive the pipeline at once, each reading its own "
        "part of the data order (slot h takes the h-th block of train.batch_size windows of every "
        "heads x batch_size). train.batch_size is per head: a sync step commits heads x batch_size "
        "samples, so it equals pmnode train at that batch.",
    )
    max_inflight: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Micro-batches a head keeps in flight at once, or auto (the default): sync keeps a "
        "whole step in flight; async starts at one step (at least one per stage) and grows to cover the "
        "measured round trip at the slowest stage's service rate (pmnode.swarm.window), at most "
        "stale_steps steps of micro-batches and inflight_bound.",
    )
    inflight_bound: int = Field(
        256, ge=1, description="The most micro-batches max_inflight auto keeps in flight."
    )
    stale_steps: float = Field(
        1.0,
        gt=0,
        description="async with max_inflight auto: at most this many steps of micro-batches in flight "
        "(never fewer than the start size). Gradients are up to about that many steps late at the "
        "head; past one step that costs held-out loss (+0.5 to +2.3% at 1.4 steps, +2.8 to +3.6% at "
        "1.9 on three of four configs: docs/benchmarks/async/method), so a link whose round trip is "
        "longer than a step gets less throughput instead.",
    )
    async_correction: Literal["none", "nesterov", "predict"] = Field(
        "nesterov",
        description="async: how a stage corrects for stale gradients (pmnode.core.staleness): nesterov is "
        "the delay-aware NAdamW of arXiv 2505.01099, predict runs the forward at weights extrapolated by the "
        "expected delay (PipeMare/SpecTrain), none is plain AdamW. sync ignores it.",
    )
    async_momentum: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="nesterov: the momentum of a stage whose gradients are n_stages steps late (less "
        "delay, nearer optim.betas[0]).",
    )
    request_timeout: float = Field(
        60.0, gt=0, description="Seconds before a micro-batch's route is given up."
    )
    average_period: float = Field(
        5.0,
        gt=0,
        description="async: seconds between the parameter-averaging rounds of a stage's replicas "
        "(hivemind DecentralizedAverager); a stage with one node never averages.",
    )
    average_compression: Literal["none", "float16"] = Field(
        "float16",
        description="async: how averaging rounds send tensors of 16 Ki elements or more (smaller ones go "
        "exactly).",
    )
    pause_limit: float = Field(
        0.0,
        ge=0,
        description="Seconds the head waits for an empty stage to get a node again before it stops the "
        "run; 0 waits for ever.",
    )
    peer_rate: float = Field(
        1000.0, gt=0, description="Data calls per second one upstream peer may make; the excess is refused."
    )
    ban_after: int = Field(
        20, ge=1, description="Rejected payloads from one peer within a minute that get it banned."
    )
    ban_seconds: float = Field(300.0, ge=0, description="How long a ban lasts.")
    max_grad_ratio: float = Field(
        100.0,
        gt=1,
        description="A boundary gradient whose norm exceeds this many times the running median is dropped.",
    )

    @property
    def inflight_limit(self) -> int:
        """The most micro-batches that can be in flight: max_inflight, or the bound when it is auto."""
        return self.inflight_bound if self.max_inflight == "auto" else self.max_inflight
