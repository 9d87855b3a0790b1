"""What a replica tells about its outer rounds (replica_sync.method: outer): in its DHT record, its
summary at exit, the coordinator's `/metrics` and status page. Its own module: the record schema
(pmnode.net.routing) imports it, and must not import the RPC machinery."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OuterReport(BaseModel):
    """A replica's outer rounds, for its record, summary, `/metrics` and the status page."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(0, description="Rounds applied as a member (its share among the round's).")
    observed: int = Field(0, description="Rounds applied without its share (left out: late or lost).")
    resynced: int = Field(0, description="Rounds it could not apply: it copied a member's state instead.")
    aborted: int = Field(0, description="Rounds nobody applied (no decision, or no members).")
    alone: int = Field(0, description="Rounds skipped: no other replica.")
    refused: dict[str, int] = Field({}, description="Shares refused, by reason.")
    bytes_per_round: int = Field(0, description="Bytes of this replica's share (compress.round_bytes).")
    bytes_sent: int = 0
    bytes_received: int = 0
    round_s: float = Field(0.0, description="Mean wall seconds from a round's start to its result.")
    blocked_s: float = Field(0.0, description="Compute-thread seconds of rounds: compress, check, apply.")
    hidden: float = Field(0.0, description="Fraction of the rounds' wall time spent while training went on.")
    round: int = Field(0, description="The round this replica is at.")
    anchor: str = Field("", description="After its last round: a digest of its anchor (replicas agree).")
    weights: str = Field("", description="At exit: a digest of the stage's weights (replicas end equal).")


class GradShareReport(BaseModel):
    """A replica's compressed gradient sums (replica_sync.method: grads), for its summary."""

    model_config = ConfigDict(extra="forbid")

    bytes_per_step: int = Field(0, description="Bytes of this replica's share of one step (round_bytes).")
    of_exact: float = Field(0.0, description="bytes_per_step over what its fp32 sums would be.")
    bytes_sent: int = Field(0, description="Bytes of shares the other replicas fetched from here.")
    bytes_received: int = Field(0, description="Bytes of shares fetched from the other replicas.")
    steps: int = Field(0, description="Steps prepared with the other replicas' shares.")
    exchange_s: float = Field(0.0, description="Mean wall seconds of a prepare fetching and adding shares.")
    refused: dict[str, int] = Field({}, description="Shares refused, by reason.")
    weights: str = Field("", description="At exit: a digest of the stage's weights (replicas end equal).")
