"""The stage interface the network layer wraps: packets in, packets out, step().

A `StageWorker` owns one stage's weights, its optimizer and the micro-batches
in flight through it. It never sees a socket: the single-process trainer
chains workers by handing packets along, and a swarm node does the same over
libp2p, so both train identically.

    head: forward(mb, tokens=...)              -> activation packet
    body: forward(mb, packet)                  -> activation packet
    tail: forward_backward(mb, packet, targets) -> (loss, gradient packet)
    body/head: backward(mb, grad packet)       -> gradient packet (None at the head)
    all:  step()                               after the stage's samples for one step
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pmnode.codecs import Codec, Packet, make_codec
from pmnode.config import OptimConfig, RunConfig
from pmnode.errors import PmnodeError
from pmnode.stages import Stage, build_subspace
from pmnode.subspace import Subspace


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at total_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(stage: Stage, optim: OptimConfig) -> torch.optim.AdamW:
    decay = [p for p in stage.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in stage.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


@dataclass
class _InFlight:
    output: Tensor | None  # codec-space output still attached to this stage's graph
    leaf: Tensor | None  # received codec-space input; its .grad goes upstream


class StageWorker:
    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        codec: str = "subspace",
        device: str | torch.device = "cpu",
        subspace: Subspace | None = None,
    ):
        self.cfg, self.index, self.device = cfg, index, torch.device(device)
        subspace = subspace if subspace is not None else build_subspace(cfg)
        self.stage = Stage(cfg, index, subspace).to(self.device)
        m = cfg.model
        self.codec: Codec = make_codec(
            codec, d_model=m.d_model, vocab_size=m.vocab_size, subspace=self.stage.subspace
        )
        self.optimizer = build_optimizer(self.stage, cfg.optim)
        self.step_count = 0
        self.inflight: dict[str, _InFlight] = {}

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    def _receive(self, packet: Packet, grad: bool) -> tuple[Tensor, Tensor | None]:
        tensors = {k: v.to(self.device) for k, v in packet.tensors.items()}
        pkt = Packet(tensors)
        z = self.codec.unpack_activation(pkt).requires_grad_(grad)
        tokens = tensors["tokens"].long() if "tokens" in tensors else None
        return z, tokens

    def _run(
        self, mb: str, packet: Packet | None, tokens: Tensor | None, grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        leaf = None
        with torch.set_grad_enabled(grad):
            if self.is_first:
                if tokens is None:
                    raise PmnodeError("the head stage needs token ids")
                tokens = tokens.to(self.device)
                x = None
            else:
                if packet is None:
                    raise PmnodeError(f"stage {self.index} needs an activation packet")
                leaf, tokens = self._receive(packet, grad)
                x = self.codec.lift(leaf, tokens)
            out = self.stage(x, tokens)
        if grad:
            self.inflight[mb] = _InFlight(None, leaf)
        return out, tokens

    def forward(self, mb: str, packet: Packet | None = None, tokens: Tensor | None = None) -> Packet:
        """Head or body: run the layers and encode the output for the next stage."""
        out, tok = self._run(mb, packet, tokens, grad=True)
        z = self.codec.project(out, tok)
        self.inflight[mb].output = z
        return self.codec.pack_activation(z, tok)

    def forward_backward(
        self, mb: str, packet: Packet, targets: Tensor, weight: float = 1.0
    ) -> tuple[float, Packet]:
        """Tail: loss on this micro-batch, backward, and the gradient packet for upstream.

        `weight` scales the gradient (micro-batch share of the step); the returned loss is unscaled.
        """
        logits, _ = self._run(mb, packet, None, grad=True)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(self.device).flatten())
        (loss * weight).backward()
        leaf = self.inflight.pop(mb).leaf
        assert leaf is not None and leaf.grad is not None
        return loss.item(), self.codec.pack_gradient(leaf.grad)

    def backward(self, mb: str, grad: Packet) -> Packet | None:
        """Head or body: backpropagate a gradient packet; return the one for upstream."""
        entry = self.inflight.pop(mb)
        g = self.codec.unpack_gradient(Packet({k: v.to(self.device) for k, v in grad.tensors.items()}))
        assert entry.output is not None
        entry.output.backward(g)
        if self.is_first:
            return None
        assert entry.leaf is not None and entry.leaf.grad is not None
        return self.codec.pack_gradient(entry.leaf.grad)

    @torch.no_grad()
    def evaluate(self, packet: Packet | None, tokens: Tensor | None = None, targets: Tensor | None = None):
        """Forward without keeping state: a packet for the next stage, or the tail's loss."""
        out, tok = self._run("", packet, tokens, grad=False)
        if self.is_last:
            assert targets is not None
            return F.cross_entropy(out.flatten(0, 1), targets.to(self.device).flatten()).item()
        return self.codec.pack_activation(self.codec.project(out, tok), tok)

    def step(self, total_steps: int | None = None) -> float:
        """Clip, AdamW step at the scheduled lr, re-project constrained weights, zero grads."""
        optim = self.cfg.optim
        lr = lr_at(self.step_count, optim, total_steps or self.cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.stage.parameters() if p.grad is not None]
        if optim.grad_clip is not None and params:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        self.optimizer.step()
        self.stage.project_()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return lr
