"""One micro-batch on the wire: a typed id, the codec's packet and the targets beside it.

The head builds an envelope once (its targets made by `make_targets` on its compute thread, with
the batch); every stage reads it with `MicroBatch.read` and passes it on with `MicroBatch.passed_on`,
so the id's text form and the targets' tensor name exist only here.

    id      MicroBatchId(step, index, attempt): "STEP:INDEX" in the header, the attempt in its ActivationMeta
    packet  what the codec made of the stage's output (never the targets)
    targets the head's labels: the last column only when the codec sends token ids (the tail
            rebuilds the rest from them), else the whole (B, T) block
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pmnode.core.codecs import Packet
from pmnode.net.meta import ActivationMeta
from pmnode.net.wire import MessageHeader, WireError

LAST_TARGET, TARGETS = "last_target", "targets"
TARGET_KEYS = (TARGETS, LAST_TARGET)  # the one place these tensor names are written


@dataclass(frozen=True)
class MicroBatchId:
    """Training micro-batch `index` of optimizer step `step`; `attempt` > 0 marks a re-send."""

    step: int
    index: int
    attempt: int = 0

    @property
    def wire(self) -> str:
        return f"{self.step}:{self.index}"

    @property
    def key(self) -> str:
        """The worker's in-flight slot: a re-send runs beside an earlier try that may still be alive."""
        return f"{self.wire}#{self.attempt}" if self.attempt else self.wire

    def retried(self, attempt: int) -> MicroBatchId:
        return replace(self, attempt=attempt)

    @classmethod
    def parse(cls, header: MessageHeader) -> MicroBatchId:
        """The id of a training micro-batch's header; WireError('unknown micro-batch') if malformed."""
        try:
            step, index = (int(v) for v in header.micro_batch.split(":"))
        except ValueError:
            raise WireError("unknown micro-batch", repr(header.micro_batch[:40])) from None
        return cls(step, index, header.meta_as(ActivationMeta).attempt)


def activation_shape(packet: Packet) -> tuple[int, int]:
    """(batch, tokens) of an activation packet: what its gradient must match."""
    main = next(v for k, v in packet.tensors.items() if k != "tokens")
    return int(main.shape[0]), int(main.shape[1])


def eval_id(index: int) -> str:
    return f"eval:{index}"


def parse_eval_id(name: str) -> int | None:
    kind, _, i = name.partition(":")
    return int(i) if kind == "eval" and i.isdigit() else None


def make_targets(y: Tensor, sends_tokens: bool, dtype: torch.dtype) -> tuple[str, Tensor]:
    """The head's labels as they travel: the last column if the codec sends the token ids."""
    return (LAST_TARGET, y[:, -1:].to(dtype)) if sends_tokens else (TARGETS, y.to(dtype))


@dataclass
class MicroBatch:
    """A micro-batch between stages (training or evaluation)."""

    name: str  # the header's micro_batch: MicroBatchId.wire or eval_id(i)
    packet: Packet
    target_key: str
    targets: Tensor

    @classmethod
    def read(cls, header: MessageHeader, packet: Packet) -> MicroBatch:
        """Split a checked wire packet (see net.checks.check_activation) into codec tensors and targets."""
        found = [k for k in TARGET_KEYS if k in packet.tensors]
        if len(found) != 1:
            raise WireError("micro-batch carries no targets")
        key = found[0]
        codec = Packet({k: v for k, v in packet.tensors.items() if k != key})
        return cls(header.micro_batch, codec, key, packet.tensors[key])

    def passed_on(self, packet: Packet) -> MicroBatch:
        """The same micro-batch with this stage's output instead of its input."""
        return replace(self, packet=packet)

    def wire_packet(self) -> Packet:
        return Packet({**self.packet.tensors, self.target_key: self.targets})

    def labels(self) -> Tensor:
        """(B, T) targets for the tail's loss."""
        if self.target_key == TARGETS:
            return self.targets.long()
        tokens = self.packet.tensors.get("tokens")
        if tokens is None:
            raise WireError("micro-batch carries no targets")
        return torch.cat([tokens[:, 1:].long(), self.targets.long()], dim=1)


def samples_of(header: MessageHeader) -> int:
    """The samples a training micro-batch's header says it holds."""
    return header.meta_as(ActivationMeta).samples
