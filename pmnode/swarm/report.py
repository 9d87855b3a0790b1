"""What a node tells others about itself, as typed models: the head's per-step line, the node's
summary at exit, and the live panel's snapshot.

`StepLine` is one JSON line per step on the head's stdout; local-swarm, `pmnode bench swarm` and
the tests read it back with `StepLine.model_validate_json`. `NodeSummary` is what `--summary-json`
writes.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pmnode.data.shards import DataPosition
from pmnode.net.outer_report import GradShareReport, OuterReport
from pmnode.net.transport import TransportStats


class StepLine(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # a diverged loss is news

    step: int
    loss: float
    tokens_per_s: float
    tokens: int
    elapsed: float = Field(description="Seconds since the first micro-batch, for windowed rates.")
    heldout_loss: float | None = None
    fwd_bytes_per_token: float = 0.0
    bwd_bytes_per_token: float = 0.0
    wire_bytes: int = 0
    epoch: int | None = None  # the head's data position after this step
    offset: int | None = None
    inflight: int | None = Field(None, description="The head's in-flight window at this step.")

    def json_line(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def parse(cls, raw: str) -> StepLine | None:
        """A line of a head's output, or None if it is another kind of line."""
        if not raw.startswith("{"):
            return None
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            return None


class Averaging(BaseModel):
    """async replicas: rounds applied, failed (no partner in time), refused (a participant without a
    certificate, or a bad result) and skipped (no other replica)."""

    rounds: int = 0
    failed: int = 0
    refused: int = 0
    alone: int = 0
    calls_refused: dict[str, int] = {}  # by door: pmnode.swarm.guarded_averager.DOORS
    calls_tunnelled: int = 0  # averaging calls that reached this replica through a relay's forwarder


class ComputeTimes(BaseModel):
    """Wall seconds the compute thread spent in forward and backward jobs (the tail's forward+backward
    counts as a backward), all its jobs together, and its CPU seconds: what `pmnode plan --measured`
    and the simulator's calibration read."""

    forward_s: float = 0.0
    forwards: int = 0
    backward_s: float = 0.0
    backwards: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0


class NodeSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    stage: int
    slot: int = 0  # a head's slot (swarm.heads > 1)
    steps: int
    schedule: str
    codec: str
    samples_applied: int
    client: dict[str, dict[str, int]]
    server: dict[str, dict[str, int]]
    rejected: dict[str, int]
    bans: int
    dropped_gradients: int
    reissued: int
    samples_off: int
    steps_lost: int
    paused_s: float
    averaging: Averaging
    outer: OuterReport | None = None  # replica_sync.method outer: its rounds
    grad_shares: GradShareReport | None = None  # replica_sync.method grads: its compressed sums
    compute: ComputeTimes = Field(default_factory=ComputeTimes)
    busy_s: float = 0.0  # seconds the compute thread worked
    process_cpu_s: float = 0.0  # CPU seconds of the node's process, every thread (not p2pd's)
    samples_served: int = 0  # samples whose backward finished here
    peak_memory_bytes: int | None = None  # CUDA: torch's peak allocation; CPU: the process's peak RSS
    tunnelled_in: dict[str, int] = {}  # handler -> calls that reached this node through a relay (net.tunnel)
    relay_forwarded: dict[str, int] | None = None  # a `--relay` member: what its forwarder carried
    spot_checks: dict[str, Any] | None = None  # head: checks, verdicts, bans; a replica: checks served
    # the head only
    samples_driven: int | None = None  # samples of this head's own batches, in the steps it drove
    data_position: DataPosition | None = None  # where its slot reads next
    final_train_loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float | None = None
    train_losses: list[float] | None = None
    evals: list[tuple[int, int, float]] | None = None
    wire_bytes_per_token_per_boundary: dict[str, float] | None = None


def counters(stats: TransportStats) -> dict[str, dict[str, int]]:
    """Every per-RPC counter, for summaries and the bytes-on-the-wire tests."""
    return {k: dict(v) for k, v in vars(stats).items()}


class Progress:
    """The head's training progress: losses, evaluations, tokens and time (others keep the loss only)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.evals: list[tuple[int, int, float]] = []
        self.last_loss: float | None = None
        self.tokens_per_s = 0.0
        self.tokens = 0
        self.elapsed = 0.0
        self.started = time.monotonic()

    @property
    def heldout(self) -> float | None:
        return self.evals[-1][2] if self.evals else None

    def line(self, step: int, held: float | None, stats: TransportStats) -> StepLine:
        tokens, elapsed = self.tokens, self.elapsed
        self.tokens_per_s = round(tokens / elapsed, 1)
        total = stats.summary()
        return StepLine(
            step=step,
            loss=round(self.losses[-1], 5),
            tokens_per_s=self.tokens_per_s,
            tokens=tokens,
            elapsed=round(elapsed, 4),
            heldout_loss=round(held, 5) if held is not None else None,
            fwd_bytes_per_token=round(stats.bytes_sent["forward"] / max(tokens, 1), 3),
            bwd_bytes_per_token=round(stats.bytes_received["forward"] / max(tokens, 1), 3),
            wire_bytes=total["bytes_sent"] + total["bytes_received"],
        )

    def head_summary(self, stats: TransportStats) -> dict[str, object]:
        tokens = self.tokens
        return {
            "final_train_loss": self.losses[-1],
            "heldout_loss": self.heldout,
            "tokens_per_s": tokens / max(self.elapsed, 1e-9),
            "train_losses": self.losses,
            "evals": self.evals,
            "wire_bytes_per_token_per_boundary": {
                "forward": stats.bytes_sent["forward"] / max(tokens, 1),
                "backward": stats.bytes_received["forward"] / max(tokens, 1),
                "forward_payload": stats.payload_sent["forward"] / max(tokens, 1),
                "backward_payload": stats.payload_received["forward"] / max(tokens, 1),
            },
        }
