"""What a bulk snapshot's manifest says besides its tensors' layout (pmnode.net.bulk): one strict,
bounded model per kind of snapshot, no JSON inside strings.

    SumsMeta   a replica's gradient sums of one step (sync commit): the step and its sample count
    StateMeta  a replica's state (pmnode.core.replica_state): the step, the optimizer's layout and
               scalars, and with outer rounds the outer state's round and the shares it carries

The digest of a manifest (BulkManifest.digest) covers its meta as dumped by these models, so a
sender's and a receiver's digests agree only if every value survives the JSON round trip: floats,
ints, bools, strings and None do, in lists as tuples do not (the sender gives lists).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_STEP = 2**31 - 1
Scalar = bool | int | float | str | None  # bool first: a JSON true is never taken for 1
Value = Scalar | Annotated[list[Scalar], Field(max_length=2**20)]  # a group's params: one index each


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SumsMeta(_Strict):
    """A replica's gradient sums (or its compressed share) of step `step`, over `samples` samples."""

    step: int = Field(ge=0, le=MAX_STEP)
    samples: int = Field(ge=-MAX_STEP, le=MAX_STEP)  # checked against the step's batch by the receiver


class HeldShare(_Strict):
    """An outer share a state copy carries (its bytes are the tensor `outer/share/{round}/{peer}`)."""

    round: int = Field(ge=0, le=MAX_STEP)
    peer: str = Field(max_length=128)
    samples: int = Field(ge=-MAX_STEP, le=MAX_STEP)  # checked with the share by the receiver


class OuterState(_Strict):
    """With outer rounds: the round of the copied outer state, and the shares it holds."""

    round: int = Field(ge=0, le=MAX_STEP)
    shares: list[HeldShare] = Field(default_factory=list, max_length=4096)


class StateMeta(_Strict):
    """A replica's state at step `step`: the optimizer's param groups and its non-tensor state
    ("{param index}/{key}" -> value), as torch's state_dict has them (tuples as lists)."""

    step: int = Field(ge=0, le=MAX_STEP)
    param_groups: list[dict[str, Value]] = Field(max_length=1024)
    optim_scalars: dict[str, Value] = Field(default_factory=dict, max_length=2**20)
    outer: OuterState | None = None


SnapshotMeta = SumsMeta | StateMeta
