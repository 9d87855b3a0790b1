"""The pipeline schedule as an object, chosen by name and handed to the parts that differ.

sync   the head flushes every step: all micro-batches back, then the step commit (every replica
       applies the same summed gradient), so a swarm equals `pmnode train` step for step
async  a stage steps as soon as a batch of samples finished backward; in-flight micro-batches
       keep the weights they ran with (weight stashing) and each stage corrects for their measured
       delay (swarm.async_correction, pmnode.core.staleness); replicas average parameters
"""

from __future__ import annotations

from dataclasses import dataclass

ASYNC_SLACK = 256  # steps an async micro-batch id may be ahead of the head's step a replica knows


@dataclass(frozen=True)
class Schedule:
    name: str
    steps_after_backward: bool  # a backward that completes the batch steps, in the same compute job
    commits: bool  # the head flushes each step and commits it with every stage's replicas
    stash_weights: bool  # micro-batches may be in flight across a step
    averages: bool  # replicas of a stage average parameters (they do not commit together)
    id_slack: int  # steps beyond the in-flight window an incoming id may be from this stage's step

    def ref_step(self, own_step: int, frontier: int) -> int:
        """The step this stage takes micro-batches around: its own or, async, the head's as far as known."""
        return max(own_step, frontier) if self.averages else own_step

    def window(self, max_inflight: int, n_micro: int) -> int:
        """How many steps away from ref_step an incoming micro-batch id may be."""
        return max_inflight // max(n_micro, 1) + self.id_slack

    def takes(self, step: int, own_step: int) -> bool:
        """sync: a replica that missed a commit takes nothing until the next one brings it up to date."""
        return self.averages or step == own_step


SYNC = Schedule("sync", False, True, False, False, 2)
ASYNC = Schedule("async", True, False, True, True, ASYNC_SLACK)
SCHEDULES = {s.name: s for s in (SYNC, ASYNC)}


def schedule_named(name: str) -> Schedule:
    return SCHEDULES[name]
