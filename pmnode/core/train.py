"""Single-process reference trainer: every stage in one process, the codec at every boundary.

It chains `StageWorker`s by handing packets along, exactly as a swarm's nodes
do over the network, so a `sync` swarm must reproduce its losses step by step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel
from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core.stages import build_subspace
from pmnode.core.worker import StageWorker


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'subspace:int8@16' -> ('subspace:int8', 16): the @k suffix sets compression_rank."""
    codec, _, rank = spec.partition("@")
    return codec, int(rank) if rank else None


def config_for(cfg: RunConfig, spec: str) -> tuple[RunConfig, str]:
    """The run config a codec trains with: the constrained model for subspace, the plain one otherwise."""
    codec, rank = parse_spec(spec)
    sub: dict = {"enabled": codec.startswith("subspace")}
    if rank is not None:
        sub.update(compression_rank=rank, compression_ratio=None)
    return cfg.with_overrides(subspace=sub, codec=codec), codec


class TrainSummary(BaseModel):
    steps: int
    final_train_loss: float
    heldout_loss: float
    heldout_bits_per_byte: float  # comparable across tokenizers
    tokens_per_s: float
    codec: str
    bytes_per_token_forward: int
    bytes_per_token_backward: int
    train_losses: list[float]
    evals: list[tuple[int, int, float]]  # (step, tokens seen, held-out loss)
    replicas: int = 1
    sync_bytes_per_round: list[int] = []  # per stage, what one replica sends per outer round
    outer_rounds: int = 0
    sync_params_per_stage: list[int] = []  # the trainable parameters those bytes stand for


class Pipeline:
    """All stages of a run in one process."""

    def __init__(
        self, cfg: RunConfig, codec: str = "subspace", device: str = "cpu", autocast_bf16: bool = False
    ):
        self.cfg = cfg
        subspace = build_subspace(cfg)
        if subspace is not None:
            subspace = subspace.to(device)
        self.workers = [
            StageWorker(cfg, i, codec, device, subspace, autocast_bf16=autocast_bf16)
            for i in range(cfg.n_stages)
        ]
        self.codec = self.workers[0].codec

    def train_step(self, inputs: Tensor, targets: Tensor, total_steps: int | None = None) -> float:
        """One optimizer step over a batch split into micro-batches; returns the mean loss."""
        losses = self.accumulate(inputs, targets)
        for w in self.workers:
            w.step(total_steps)
        return sum(losses) / len(losses)

    def accumulate(self, inputs: Tensor, targets: Tensor, first: int = 0) -> list[float]:
        """Forward and backward of every micro-batch of `inputs`: gradients summed, no step taken.
        `first`: the index of its first micro-batch in the step (ids are unique within a step)."""
        micro = self.cfg.train.micro
        n = inputs.shape[0] // micro
        head, *rest = self.workers
        losses = []
        for i in range(n):
            mb = f"{head.step_count}:{first + i}"
            x, y = inputs[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]
            if not rest:  # one stage: the head is also the tail
                losses.append(head.forward_backward(mb, None, y, tokens=x)[0])
                continue
            p = head.forward(mb, tokens=x, samples=micro)
            for w in rest[:-1]:
                p = w.forward(mb, p, samples=micro)
            loss, g = rest[-1].forward_backward(mb, p, y)
            losses.append(loss)
            for w in reversed(self.workers[:-1]):
                assert g is not None  # only the head's backward returns None, and it comes last
                g = w.backward(mb, g)
        return losses

    def eval_loss(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        return eval_loss(self.workers, batches)


@torch.no_grad()
def eval_loss(workers: list[StageWorker], batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean held-out loss of the stages `workers`, chained as a forward without gradients."""
    total = 0.0
    for x, y in batches:
        p = None
        for w in workers[:-1]:
            p = w.evaluate(p, tokens=x)
        total += workers[-1].evaluate(p, tokens=x, targets=y)
    return total / len(batches)


@dataclass
class StepInfo:
    step: int
    loss: float
    tokens_per_s: float
    heldout: float | None = None
    extra: dict = field(default_factory=dict)


def train(
    cfg: RunConfig,
    codec: str = "subspace",
    device: str = "cpu",
    on_step: Callable[[StepInfo], None] | None = None,
    on_end: Callable[[Pipeline, list[tuple[Tensor, Tensor]]], None] | None = None,
    autocast_bf16: bool = False,
    replicas: int = 1,
) -> TrainSummary:
    """Train cfg.train.steps steps; evaluate held-out loss every eval_every steps and at the end.

    `on_end(pipeline, heldout_batches)` sees the trained model, e.g. for diagnostics. `replicas` > 1
    with `replica_sync.method: outer` trains R replicas of every stage joined by the outer loop
    (pmnode.core.replica_train); with `step` the replicas' summed gradients are this pipeline's."""
    t = cfg.train
    from pmnode.core.replica_train import ReplicatedPipeline
    from pmnode.data.resolve import open_data
    from pmnode.data.shards import DataPosition

    # a bad codec fails before any data is prepared
    outer = replicas > 1 and cfg.replica_sync.method in ("outer", "grads")
    pipe: Pipeline | ReplicatedPipeline = (
        ReplicatedPipeline(cfg, codec, device, replicas, autocast_bf16)
        if outer
        else Pipeline(cfg, codec, device, autocast_bf16)
    )
    data = open_data(cfg.data, t.seq_len, cfg.model.vocab_size)
    eval_batches = data.heldout.eval_batches(t.eval_batches, t.batch_size)
    pos = DataPosition()
    losses: list[float] = []
    evals: list[tuple[int, int, float]] = []
    tokens_per_step = t.batch_size * t.seq_len
    elapsed = 0.0
    for step in range(t.steps):
        x, y, pos = data.train.batch(pos, t.batch_size, t.seed)
        start = time.perf_counter()
        loss = pipe.train_step(x.to(device), y.to(device), t.steps)
        elapsed += time.perf_counter() - start
        losses.append(loss)
        held = None
        if (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
            held = pipe.eval_loss([(a.to(device), b.to(device)) for a, b in eval_batches])
            evals.append((step + 1, (step + 1) * tokens_per_step, held))
        if on_step:
            on_step(StepInfo(step + 1, loss, (step + 1) * tokens_per_step / max(elapsed, 1e-9), held))
    if on_end:  # replicas: the first lane's model (the lanes end one model after the last round)
        on_end(pipe.lanes[0] if isinstance(pipe, ReplicatedPipeline) else pipe, eval_batches)
    return TrainSummary(
        steps=t.steps,
        final_train_loss=losses[-1],
        heldout_loss=evals[-1][2],
        heldout_bits_per_byte=data.bits_per_byte(evals[-1][2]),
        tokens_per_s=t.steps * tokens_per_step / max(elapsed, 1e-9),
        codec=codec,
        bytes_per_token_forward=pipe.codec.bytes_per_token_forward(),
        bytes_per_token_backward=pipe.codec.bytes_per_token_backward(),
        train_losses=losses,
        evals=evals,
        replicas=replicas,
        sync_bytes_per_round=pipe.bytes_per_round if isinstance(pipe, ReplicatedPipeline) else [],
        outer_rounds=pipe.rounds if isinstance(pipe, ReplicatedPipeline) else 0,
        sync_params_per_stage=pipe.params_per_stage if isinstance(pipe, ReplicatedPipeline) else [],
    )
