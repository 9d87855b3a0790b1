"""What a data-plane message says besides its address and tensors: one strict model per kind.

Every `MessageHeader` names its `kind`, and its `meta` is that kind's model, validated strictly
(no coercion, no unknown field, bounded numbers and strings) when the header is decoded, so a
handler reads typed fields and never a dict by key:

    activation  forward and eval requests   ActivationMeta: samples, attempt (a re-send's try)
    gradient    forward reply               GradientMeta: the tail's loss
    loss        eval reply                  LossMeta: the tail's loss
    error       any reply                   ErrorMeta: the refusal's reason
    check       spot-check request          CheckRequest: op (sent | compute), at (the step)
    output      spot-check reply            OutputMeta: at (the step the output is of)
    open        bulk: a snapshot's manifest BulkOpen: step (the step the snapshot must be of)
    chunk       bulk: one chunk             BulkChunk: ticket, index
    close       bulk: done with a snapshot  BulkClose: ticket
    share       outer round share           ShareMeta: round, samples
    ack         any other reply             AckMeta: late (an outer share of a round over here)
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal[
    "activation", "gradient", "loss", "error", "check", "output", "open", "chunk", "close", "share", "ack"
]
MAX_COUNT = 2**31 - 1  # samples, tries, steps, chunk indices: far above any honest value, bounded
TICKET_LEN = 64


class _Meta(BaseModel):
    # strict: "3" is not a step; NaN/Inf survive the round trip (a diverged loss is still news)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, ser_json_inf_nan="constants")
    kind: ClassVar[Kind]


class ActivationMeta(_Meta):
    """A micro-batch going down: the samples it holds and, for a re-send, its try (MicroBatchId)."""

    kind: ClassVar[Kind] = "activation"
    samples: int = Field(1, ge=0, le=MAX_COUNT)
    attempt: int = Field(0, ge=0, le=MAX_COUNT)


class GradientMeta(_Meta):
    """A forward's reply: the gradient of the input, and the tail's loss of the micro-batch."""

    kind: ClassVar[Kind] = "gradient"
    loss: float = math.nan


class LossMeta(_Meta):
    """An evaluation's reply: the tail's loss of the batch."""

    kind: ClassVar[Kind] = "loss"
    loss: float


class ErrorMeta(_Meta):
    """A refusal: its reason, whose first phrase (before ':') is what gets counted."""

    kind: ClassVar[Kind] = "error"
    reason: str = Field(max_length=300)


class CheckRequest(_Meta):
    """Spot check: the output a replica sent for the micro-batch, or what it computes now, at step `at`."""

    kind: ClassVar[Kind] = "check"
    op: Literal["sent", "compute"]
    at: int = Field(ge=0, le=MAX_COUNT)


class OutputMeta(_Meta):
    """A spot check's reply: the output, of the replica's step `at`."""

    kind: ClassVar[Kind] = "output"
    at: int = Field(ge=0, le=MAX_COUNT)


class BulkOpen(_Meta):
    """Bulk: open a snapshot (net.bulk); `step`: the step its content must be of, if one is asked for."""

    kind: ClassVar[Kind] = "open"
    step: int | None = Field(None, ge=0, le=MAX_COUNT)


class BulkChunk(_Meta):
    """Bulk: chunk `index` of the snapshot under `ticket`."""

    kind: ClassVar[Kind] = "chunk"
    ticket: str = Field(max_length=TICKET_LEN)
    index: int = Field(ge=0, le=MAX_COUNT)


class BulkClose(_Meta):
    """Bulk: the receiver is done with the snapshot under `ticket`."""

    kind: ClassVar[Kind] = "close"
    ticket: str = Field(max_length=TICKET_LEN)


BulkRequest = BulkOpen | BulkChunk | BulkClose


class ShareMeta(_Meta):
    """An outer round's share: its round and sample count (checked by the receiver, not here)."""

    kind: ClassVar[Kind] = "share"
    round: int = Field(ge=0, le=MAX_COUNT)
    samples: int = Field(ge=-MAX_COUNT, le=MAX_COUNT)


class AckMeta(_Meta):
    """Any other reply; `late`: an outer share of a round that is over here (not malformed)."""

    kind: ClassVar[Kind] = "ack"
    late: bool = False


Meta = (
    ActivationMeta
    | GradientMeta
    | LossMeta
    | ErrorMeta
    | CheckRequest
    | OutputMeta
    | BulkOpen
    | BulkChunk
    | BulkClose
    | ShareMeta
    | AckMeta
)
META_OF: dict[str, type[_Meta]] = {
    m.kind: m
    for m in (
        ActivationMeta,
        GradientMeta,
        LossMeta,
        ErrorMeta,
        CheckRequest,
        OutputMeta,
        BulkOpen,
        BulkChunk,
        BulkClose,
        ShareMeta,
        AckMeta,
    )
}
