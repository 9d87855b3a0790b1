"""What the swarm simulator takes and gives: typed specs of the stages, nodes and links, and results.

Times are seconds per micro-batch on one node; bandwidth is bytes/s of a node's outgoing links
(None: unlimited), latency one way, as in pmnode.net.shaping. The tail's forward and backward are one
job on a real node (`forward_backward`), so a tail's time goes in `bwd_s` with `fwd_s` 0.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSpec(_Spec):
    bandwidth: float | None = Field(None, gt=0, description="Bytes/s of this node's outgoing links.")
    latency: float = Field(0.0, ge=0, description="One-way seconds of this node's outgoing links.")
    speed: float = Field(1.0, gt=0, description="Compute speed relative to the stage's times.")
    join_at: float = Field(0.0, ge=0, description="Seconds into the run this node starts serving.")
    leave_at: float | None = Field(None, ge=0, description="Seconds into the run this node dies.")
    msg_s: float | None = Field(
        None, ge=0, description="This node's event-loop time per message, if not the swarm's."
    )
    byte_s: float = Field(
        0.0,
        ge=0,
        description="CPU seconds per byte of replica-sync traffic through the RPC stack (serialising, "
        "checking, the daemon): a round takes at least bytes x byte_s even on an unlimited link.",
    )


class SyncSpec(_Spec):
    """A stage's replica-sync rounds (pmnode.plan.sync): what each replica uploads, how often, and
    whether it waits. The uplink is the one the node's activations take; downlinks are not modelled."""

    bytes_up: float = Field(ge=0, description="Bytes each replica uploads per round.")
    every_steps: int | None = Field(None, ge=1, description="A round every this many steps.")
    every_s: float | None = Field(
        None, gt=0, description="Or on a grid of this many seconds, after the last round ended."
    )
    mode: Literal["overlap", "blocking", "commit"] = Field(
        "overlap",
        description="overlap: beside compute, a replica waits only when the next round is due and the "
        "last has not landed; blocking: the replica waits for each round; commit: in the sync commit.",
    )


class StageSpec(_Spec):
    fwd_s: float = Field(ge=0, description="Forward compute per micro-batch.")
    bwd_s: float = Field(ge=0, description="Backward compute per micro-batch (the tail: forward too).")
    step_s: float = Field(0.0, ge=0, description="Optimizer step, once per step.")
    nodes: list[NodeSpec] = Field(
        default_factory=lambda: [NodeSpec()],
        min_length=1,
        description="The stage's replicas; stage 0's are heads, each with its own window and its own "
        "micro_batches_per_step micro-batches of every step.",
    )
    sync: SyncSpec | None = Field(None, description="Replica-sync rounds (with more than one node).")


class SwarmSpec(_Spec):
    stages: list[StageSpec] = Field(min_length=1)
    schedule: Literal["sync", "async"] = "async"
    max_inflight: int = Field(4, ge=1, description="Per head.")
    micro_batches_per_step: int = Field(1, ge=1, description="Per head.")
    tokens_per_micro_batch: int = Field(ge=1)
    fwd_bytes_per_token: float = Field(ge=0)
    bwd_bytes_per_token: float = Field(ge=0)
    msg_s: float = Field(
        0.0, ge=0, description="Event-loop time per message at each end (encode, decode, checks); serial."
    )
    hop_s: float = Field(0.0, ge=0, description="Fixed delay per message on top of the link (RPC stack).")
    shaped_late_s: float = Field(
        0.0,
        ge=0,
        description="Emulation only: how late a message that waited on an emulated link is woken (timer and "
        "scheduling delay on a loaded machine).",
    )
    commit_round_trips: int = Field(2, ge=0, description="sync: prepare and apply, head to every stage.")
    commit_latency: bool = Field(
        True, description="Commits pay the links' latency (in-process emulation shapes only data calls)."
    )
    link_per_peer: bool = Field(
        False,
        description="Each peer gets its own link at the full bandwidth, as the in-process emulation does; "
        "by default a node's uplink is one, shared by all its peers.",
    )
    loop_shares_compute: bool = Field(
        False, description="A node's event loop and compute thread take turns (one interpreter lock)."
    )
    retry_s: float = Field(1.0, ge=0, description="Time for an upstream node to notice a dead replica.")
    seed: int = 0


class StageResult(_Spec):
    stage: int
    nodes: int
    utilisation: float  # compute busy / (nodes alive x time), over the measured part
    micro_batches: int
    busiest_share: float = 0.0  # of those, the share its busiest node served (1/nodes: balanced)
    sync_rounds: int = 0  # replica-sync rounds started, all replicas together
    sync_round_s: float = 0.0  # their mean duration, start to last byte
    sync_waited: float = 0.0  # the share of the replicas' time spent waiting for a round to land


class SimResult(_Spec):
    tokens_per_s: float
    steps: int
    seconds: float
    step_s: float  # mean seconds per step over the measured part
    stages: list[StageResult]
    retried: int  # micro-batches sent again after a replica died
    binding: str  # what bounds the rate: compute stage N, link N->N+1, latency/window, commit
    stalled: bool = False  # ended early: nothing finished for a long while
