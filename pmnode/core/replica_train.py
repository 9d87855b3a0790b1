"""R replicas of every stage in one process, kept together by the outer loop: what replica sync costs
in learning, measured with no network (`pmnode bench convergence --replicas R`).

Replica r of the swarm is a lane: a whole pipeline (every stage) that trains on its own 1/R of each
batch, as the replicas of a swarm each take their own micro-batches. Every `inner_steps` steps each
stage's replicas run one outer round (pmnode.core.outer) over their pseudo-gradients, compressed as
the config says. With `overlap`, a round's result lands one round later (the worst case of a round
that takes all of the next inner steps to travel) and is applied as a delta; without it, at once.

`replica_sync.method: grads` needs one lane too: the replicas apply the same decoded total every step,
so they hold the same weights; pmnode.core.grad_sync computes each replica's compressed share in turn.

`replica_sync.method: step` needs no lanes: replicas that sum their gradients every step are the single
pipeline on the combined batch (the swarm's exactness tests show it), so that is what runs.
"""

from __future__ import annotations

from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core.compress import round_bytes
from pmnode.core.grad_sync import GradShares, take_grads
from pmnode.core.outer import OuterSync, Share
from pmnode.core.train import Pipeline
from pmnode.errors import ConfigError


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a.add_(b)


def lane_config(cfg: RunConfig, replicas: int) -> RunConfig:
    """One replica's share of the batch: batch_size / R sequences, micro-batches no larger."""
    t = cfg.train
    if t.batch_size % replicas:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split over {replicas} replicas")
    batch = t.batch_size // replicas
    micro = min(t.micro, batch)
    if batch % micro:
        raise ConfigError(f"a replica's batch of {batch} does not split into micro-batches of {micro}")
    return cfg.with_overrides(train={"batch_size": batch, "micro_batch_size": micro})


class ReplicatedPipeline:
    """R lanes of a pipeline, each stage's replicas joined by an outer loop. Pipeline's interface:
    `train_step`, `eval_loss` (replica 0's weights, what its checkpoint would hold), `workers`."""

    def __init__(
        self, cfg: RunConfig, codec: str, device: str, replicas: int, autocast_bf16: bool = False
    ) -> None:
        self.cfg, self.sync = cfg, cfg.replica_sync
        lane = lane_config(cfg, replicas)
        self.grads: list[list[GradShares]] | None = None
        if self.sync.method == "grads":  # one pipeline for all: the whole batch, a replica's micro-batches
            whole = cfg.with_overrides(train={"micro_batch_size": lane.train.micro})
            self.lanes = [Pipeline(whole, codec, device, autocast_bf16)]
            trainable = [[p for p in w.stage.parameters() if p.requires_grad] for w in self.lanes[0].workers]
            self.grads = [
                [GradShares(ps, self.sync, seed=1000 * s + 100 * r) for s, ps in enumerate(trainable)]
                for r in range(replicas)
            ]
        else:
            self.lanes = [Pipeline(lane, codec, device, autocast_bf16) for _ in range(replicas)]
        self.workers, self.codec = self.lanes[0].workers, self.lanes[0].codec
        self.outer = [
            [
                OuterSync(
                    [p for p in w.stage.parameters() if p.requires_grad],
                    self.sync,
                    seed=1000 * s,
                    split_batch=True,  # each lane takes 1/R of every batch, as sync replicas do
                )
                for s, w in enumerate(lane.workers)
            ]
            for lane in self.lanes
        ]
        # bytes one replica sends per round, for every stage it holds (a swarm node holds one)
        self.bytes_per_round = [round_bytes(o.shapes, self.sync) for o in self.outer[0]]
        self.params_per_stage = [sum(p.numel() for p in o.params) for o in self.outer[0]]
        self.pending: list[list[Share]] | None = None  # per stage, the shares of the round in flight
        self.steps = 0
        self.rounds = 0

    def train_step(self, inputs: Tensor, targets: Tensor, total_steps: int | None = None) -> float:
        if self.grads is not None:
            return self._grads_step(inputs, targets, total_steps)
        n = len(self.lanes)
        xs, ys = inputs.chunk(n), targets.chunk(n)
        losses = []
        for lane, outer, x, y in zip(self.lanes, self.outer, xs, ys, strict=True):
            losses.append(lane.train_step(x, y, total_steps))
            for o in outer:
                o.note_samples(x.shape[0])
        self.steps += 1
        if self.steps % self.sync.inner_steps == 0:
            self._round()
        return sum(losses) / n

    def _grads_step(self, inputs: Tensor, targets: Tensor, total_steps: int | None) -> float:
        """Each replica's share of the batch in turn, its gradient sums compressed; one step on the total."""
        assert self.grads is not None
        pipe, losses = self.lanes[0], list[float]()
        totals: list[list[Tensor | None] | None] = [None] * len(pipe.workers)
        for replica, x, y in zip(
            self.grads, inputs.chunk(len(self.grads)), targets.chunk(len(self.grads)), strict=True
        ):
            losses += pipe.accumulate(x, y, first=len(losses))
            for s, (w, shares) in enumerate(zip(pipe.workers, replica, strict=True)):
                w.collect_grads()
                decoded = shares.share(take_grads(shares.params))
                total = totals[s]
                totals[s] = decoded if total is None else list(map(_add, total, decoded))
        for w, total, shares in zip(pipe.workers, totals, self.grads[0], strict=True):
            for p, g in zip(shares.params, total or [], strict=True):
                p.grad = None if g is None else g.to(p.dtype)
            w.step(total_steps)
        self.steps += 1
        self.rounds += 1
        return sum(losses) / len(losses)

    def _round(self) -> None:
        stages = range(len(self.workers))
        if self.pending is not None:  # the round in flight lands now
            self._finish(self.pending)
        shares = [[lanes_outer[s].start() for lanes_outer in self.outer] for s in stages]
        if self.sync.overlap:
            self.pending = shares
        else:
            self._finish(shares)

    def _finish(self, shares: list[list[Share]]) -> None:
        for s, stage_shares in enumerate(shares):
            for lanes_outer in self.outer:
                lanes_outer[s].finish(stage_shares)
        self.pending = None
        self.rounds += 1

    def eval_loss(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        return self.lanes[0].eval_loss(batches)
