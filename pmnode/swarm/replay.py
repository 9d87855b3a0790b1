"""The replay window: which (micro-batch, try) pairs a stage has taken, kept only while they matter."""

from __future__ import annotations

from pmnode.net.envelope import MicroBatchId


class ReplayWindow:
    """Tries taken per micro-batch id. Ids far behind the stage's step cannot pass the id window
    (net.checks.check_micro_batch) any more, so they are dropped once the table grows past `limit`."""

    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight
        self.limit = 4 * max_inflight + 64
        self.seen: dict[str, set[int]] = {}  # micro-batch id -> tries taken here
        self.step_of: dict[str, int] = {}

    def taken(self, mb: MicroBatchId) -> bool:
        return mb.attempt in self.seen.get(mb.wire, ())

    def remember(self, mb: MicroBatchId, ref_step: int) -> None:
        self.seen.setdefault(mb.wire, set()).add(mb.attempt)
        self.step_of[mb.wire] = mb.step
        if len(self.seen) > self.limit:
            oldest = ref_step - self.max_inflight - 4
            self.step_of = {k: v for k, v in self.step_of.items() if v >= oldest}
            self.seen = {k: v for k, v in self.seen.items() if k in self.step_of}
