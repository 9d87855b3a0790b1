"""The two RPCs of outer rounds between the replicas of one stage (replica_sync.method: outer).

    outer_share  data  the same stage  a replica's compressed share of round r -> ack
    outer_vote   JSON  the same stage  Vote (round r: whose shares I hold) -> Decision

Only certified replicas of the stage get in (Admission.SAME_STAGE, on the certificate bound to the
connection's peer id); whose share a message is, is that peer id, never a field. A share is one
uint8 tensor of exactly `round_bytes(shapes)` bytes (pmnode.core.share_bytes): the server's wire
limit is set from that count, so an upload larger than an honest share is cut off while streaming,
before it is buffered. Its round and sample count travel as the header's `ShareMeta` (pmnode.net.meta).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pmnode.net.services import Admission, DataRpc, JsonRpc
from pmnode.net.wire import WireLimits

HEADER_SLACK = 4096 + 1024  # the message's framing: length prefix and header JSON, at most


class Vote(BaseModel):
    """A replica -> the round's leader: which shares of round `round` it holds (its own included)."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    have: list[str] = Field(max_length=256, description="Peer ids whose checked share of the round it holds.")
    final: bool = Field(False, description="The replica's training is over: its last round.")


class Decision(BaseModel):
    """The leader's answer: the round's members (sorted: the order every replica sums them in; the
    others observe the round, applying the same shares), or not yet."""

    model_config = ConfigDict(extra="forbid")

    round: int
    status: Literal["pending", "decided", "not_leader", "gone"]  # gone: forgotten, copy a member's state
    members: list[str] = Field([], max_length=256)
    final: bool = Field(False, description="Every member's training is over.")
    next_round: int = Field(0, ge=0, description="The round the leader is at: where a late replica goes on.")


class Ack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ok: bool = True


SHARE = DataRpc("outer_share", Admission.SAME_STAGE)
VOTE = JsonRpc("outer_vote", Vote, Decision, Admission.SAME_STAGE)


def share_limits(share_bytes: int) -> WireLimits:
    """The server's limits for outer_share: one tensor of the stage's share size, plus its framing."""
    return WireLimits(max_bytes=share_bytes + HEADER_SLACK, max_tensors=1)
