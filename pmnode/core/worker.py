"""The stage interface the network layer wraps: packets in, packets out, step().

A `StageWorker` owns one stage's weights, its optimizer and the micro-batches
in flight through it. It never sees a socket: the single-process trainer
chains workers by handing packets along, and a swarm node does the same over
libp2p, so both train identically.

    head: forward(mb, tokens=...)              -> activation packet
    body: forward(mb, packet)                  -> activation packet
    tail: forward_backward(mb, packet, targets) -> (loss, gradient packet)
    body/head: backward(mb, grad packet)       -> gradient packet (None at the head)
    tail: logits(packet)                       -> (B, T, V) logits, for sampling
    all:  step()                               after the stage's samples for one step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pmnode.config import RunConfig
from pmnode.core.codecs import Codec, Packet, make_codec
from pmnode.core.optim import build_optimizer, lr_at
from pmnode.core.stages import Stage, build_subspace
from pmnode.core.staleness import Correction, StaleCorrection
from pmnode.core.subspace import Subspace
from pmnode.errors import PmnodeError


@dataclass
class _InFlight:
    version: int
    samples: int
    output: Tensor | None = None  # codec-space output still attached to this stage's graph
    leaf: Tensor | None = None  # received codec-space input; its .grad goes upstream


class StageWorker:
    """One stage's weights, optimizer and in-flight micro-batches.

    Gradients of a micro-batch are summed per sample (the tail backpropagates
    loss x samples) and `step()` divides by the samples it applies, so a step
    is the mean gradient over exactly the samples whose backward finished.

    stash_weights (for the async schedule): a step may come while micro-batches
    are between their forward and backward here. Their graphs then hold a
    frozen copy of the weights they ran with (PipeDream's weight stashing), so
    the in-place optimizer step never invalidates them; their gradients join
    the next step. Without stashing (sync), stepping with micro-batches in
    flight is an error.

    correction (async): what the stage does about those late gradients (pmnode.core.staleness).
    """

    def __init__(
        self,
        cfg: RunConfig,
        index: int,
        codec: str = "subspace",
        device: str | torch.device = "cpu",
        subspace: Subspace | None = None,
        stash_weights: bool = False,
        autocast_bf16: bool = False,
        checkpoint_layers: bool = False,
        optimizer_state: str = "fp32",
        fused_adam: bool = False,
        correction: Correction = "none",
    ):
        self.cfg, self.index, self.device = cfg, index, torch.device(device)
        self.autocast_bf16 = autocast_bf16  # this machine's choice (MachineConfig), not the run's
        if subspace is None:
            subspace = build_subspace(cfg)
        self.stage = Stage(cfg, index, subspace).to(self.device)
        m = cfg.model
        self.codec: Codec = make_codec(
            codec, d_model=m.d_model, vocab_size=m.vocab_size, subspace=self.stage.subspace
        )
        self.stage.checkpoint_layers = checkpoint_layers
        # Stale-gradient correction (async only: without stashing no gradient is ever late).
        kind: Correction = correction if stash_weights else "none"
        self.correction = StaleCorrection(kind, cfg.n_stages, cfg.swarm.async_momentum)
        self.optimizer = build_optimizer(self.stage, cfg.optim, optimizer_state, fused_adam, kind)
        self.stash_weights = stash_weights
        self.step_count = 0
        self.samples_ready = 0  # backward finished, not yet applied
        self.inflight: dict[str, _InFlight] = {}
        self._stashes: dict[int, dict[str, Tensor]] = {}
        # Micro-batches whose gradients this stage has accumulated, by step: a re-issued one passes
        # through again for its input gradient, but never adds to the weights' gradients twice.
        self.accumulated: dict[str, int] = {}

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    def _call_stage(self, x: Tensor | None, tokens: Tensor | None, grad: bool) -> Tensor:
        # bf16 autocast covers the layers only: the codec's projections and the loss stay in fp32.
        bf16 = self.autocast_bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            if not (grad and self.stash_weights):
                out = self.stage(x, tokens)
            else:
                params = self._stashes.get(self.step_count)
                if params is None:
                    params = self.correction.forward_weights(self.stage)
                    self._stashes[self.step_count] = params
                out = torch.func.functional_call(self.stage, params, (x, tokens))
        return out.float()

    def _run(
        self, mb: str, packet: Packet | None, tokens: Tensor | None, samples: int, grad: bool
    ) -> tuple[Tensor, Tensor | None]:
        leaf = None
        with torch.set_grad_enabled(grad):
            if self.is_first:
                if tokens is None:
                    raise PmnodeError("the head stage needs token ids")
                tokens, x = tokens.to(self.device), None
            else:
                if packet is None:
                    raise PmnodeError(f"stage {self.index} needs an activation packet")
                tensors = {k: v.to(self.device) for k, v in packet.tensors.items()}
                leaf = self.codec.unpack_activation(Packet(tensors)).requires_grad_(grad)
                tokens = tensors["tokens"].long() if "tokens" in tensors else None
                x = self.codec.lift(leaf, tokens)
            out = self._call_stage(x, tokens, grad)
        if grad:
            self.inflight[mb] = _InFlight(self.step_count, samples, leaf=leaf)
        return out, tokens

    def forward(
        self, mb: str, packet: Packet | None = None, tokens: Tensor | None = None, samples: int = 1
    ) -> Packet:
        """Head or body: run the layers and encode the output for the next stage."""
        out, tok = self._run(mb, packet, tokens, samples, grad=True)
        z = self.codec.project(out, tok)
        self.inflight[mb].output = z
        return self.codec.pack_activation(z, tok)

    def forward_backward(
        self, mb: str, packet: Packet | None, targets: Tensor, tokens: Tensor | None = None
    ) -> tuple[float, Packet | None]:
        """Tail: mean loss on this micro-batch, backward, and the gradient packet for upstream.

        A one-stage run passes tokens instead of a packet and gets no packet back.
        """
        samples = targets.shape[0]
        logits, _ = self._run(mb, packet, tokens, samples, grad=True)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(self.device).flatten())
        entry = self.inflight[mb]
        if self._first_time(mb):
            (loss * samples).backward()
            leaf = self._finish(mb).leaf
            if leaf is None:
                return loss.item(), None
            assert leaf.grad is not None
            return loss.item(), self.codec.pack_gradient(leaf.grad)
        self.inflight.pop(mb)
        assert entry.leaf is not None
        (g,) = torch.autograd.grad(loss * samples, entry.leaf)
        return loss.item(), self.codec.pack_gradient(g)

    def backward(self, mb: str, grad: Packet) -> Packet | None:
        """Head or body: backpropagate a gradient packet; return the one for upstream."""
        entry = self.inflight[mb]
        g = self.codec.unpack_gradient(Packet({k: v.to(self.device) for k, v in grad.tensors.items()}))
        assert entry.output is not None
        if self._first_time(mb):
            entry.output.backward(g)
            self._finish(mb)
            if self.is_first:
                return None
            assert entry.leaf is not None and entry.leaf.grad is not None
            return self.codec.pack_gradient(entry.leaf.grad)
        self.inflight.pop(mb)  # seen before: only the input gradient, for the stages upstream
        if self.is_first:
            return None
        assert entry.leaf is not None
        (up,) = torch.autograd.grad(entry.output, entry.leaf, g)
        return self.codec.pack_gradient(up)

    def _first_time(self, mb: str) -> bool:
        """Claim micro-batch `mb` (an attempt suffix "#n" aside) for this stage's gradients, once."""
        base = mb.split("#", 1)[0]
        if base in self.accumulated:
            return False
        self.accumulated[base] = self.step_count
        if len(self.accumulated) > 4096:  # ids this old can no longer come back
            keep = self.step_count - 64
            self.accumulated = {k: v for k, v in self.accumulated.items() if v >= keep}
        return True

    def _finish(self, mb: str) -> _InFlight:
        entry = self.inflight.pop(mb)
        self.samples_ready += entry.samples
        self.correction.meter.finished(entry.version, entry.samples)
        return entry

    def abandon(self, mb: str) -> bool:
        """Forget a micro-batch whose backward will never come (a failed route)."""
        return self.inflight.pop(mb, None) is not None

    @torch.no_grad()
    def evaluate(self, packet: Packet | None, tokens: Tensor | None = None, targets: Tensor | None = None):
        """Forward without keeping state: a packet for the next stage, or the tail's loss."""
        out, tok = self._run("", packet, tokens, 0, grad=False)
        if self.is_last:
            assert targets is not None
            return F.cross_entropy(out.flatten(0, 1), targets.to(self.device).flatten()).item()
        return self.codec.pack_activation(self.codec.project(out, tok), tok)

    @torch.no_grad()
    def logits(self, packet: Packet | None, tokens: Tensor | None = None) -> Tensor:
        """Tail: fp32 logits (B, T, V) without keeping state, for sampling."""
        if not self.is_last:
            raise PmnodeError(f"stage {self.index} is not the tail: only the tail has logits")
        return self._run("", packet, tokens, 0, grad=False)[0]

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Every finished micro-batch's gradients in the weights' .grad (what `step` does first)."""
        self._collect_grads()

    def _collect_grads(self) -> None:
        """Fold stashed gradients into the master weights; drop stashes nothing needs any more."""
        masters = dict(self.stage.named_parameters())
        live = {e.version for e in self.inflight.values()}
        for version, params in list(self._stashes.items()):
            for name, p in params.items():
                if p.grad is not None:
                    m = masters[name]
                    m.grad = p.grad.clone() if m.grad is None else m.grad.add_(p.grad)
                    p.grad = None
            if version not in live:
                del self._stashes[version]

    def grad_vector(self) -> Tensor:
        """This stage's accumulated gradient sums, flat, in parameter order (zeros where none)."""
        self._collect_grads()
        return torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                for p in self.stage.parameters()
            ]
        )

    def set_grads(self, flat: Tensor, samples: int) -> None:
        """Replace the accumulated gradients by `flat` (summed over `samples`), e.g. all replicas' sum."""
        offset = 0
        for p in self.stage.parameters():
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
            offset += n
        self.samples_ready = samples

    def forget(self, step: int) -> None:
        """Drop the gradients accumulated at `step` and forget which micro-batches they came from."""
        if self.inflight:
            raise PmnodeError(f"stage {self.index}: reset with {len(self.inflight)} micro-batches in flight")
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_ready = 0
        self.correction.meter.forget()
        self.accumulated = {k: v for k, v in self.accumulated.items() if v != step}

    def step(self, total_steps: int | None = None, lr_step: int | None = None) -> tuple[int, float]:
        """Mean gradient over the finished samples, clip, AdamW at the scheduled lr, re-project.

        `lr_step` puts the schedule at another step than this worker's own count (an async replica
        makes only its share of the stage's steps). Returns (samples applied, lr).
        """
        if self.inflight and not self.stash_weights:
            raise PmnodeError(f"stage {self.index}: step with {len(self.inflight)} micro-batches in flight")
        self._collect_grads()
        applied, optim = self.samples_ready, self.cfg.optim
        params = [p for p in self.stage.parameters() if p.grad is not None]
        if applied:
            for p in params:
                assert p.grad is not None  # params holds only those with a gradient
                p.grad.div_(applied)
        self.stage.project_grads_()
        lr = lr_at(
            self.step_count if lr_step is None else lr_step, optim, total_steps or self.cfg.train.steps
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if optim.grad_clip is not None and params:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        self.correction.before_step(self.optimizer, self.stage, self.step_count)
        self.optimizer.step()
        self.stage.project_()
        self.correction.after_step(self.stage)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.samples_ready = 0
        return applied, lr
