"""Async replicas of one stage keep one set of weights by averaging parameters with hivemind.

Sync replicas need none of this: they add up the same gradients at every step's commit and stay
bit-identical. Async replicas each step on the micro-batches routed to them, so their weights drift
apart; every `swarm.average_period` seconds they meet in a hivemind `DecentralizedAverager` group
(one prefix per stage, `{run}_stage{S}`) and average their parameters, weighted by the samples
each applied since the last round. Training goes on during a round, so the result is applied as a
delta (p += average - snapshot) that keeps the steps taken meanwhile.

hivemind's averager knows nothing of pmnode's certificates: pmnode.swarm.guarded_averager puts its
RPCs behind the node's guard, so only certified replicas of this stage take part. Every participant
also all-gathers its certificate: a round that still includes a peer without one for this stage, or
whose result is not finite, is thrown away (counted) and never touches the weights. A stage with one
replica never starts an averager and pays nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from hivemind import DHT
from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from pmnode.core.worker import StageWorker
from pmnode.net.auth import AuthError, Cert, Verifier
from pmnode.swarm.guarded_averager import AveragingGate, GuardedAverager

MATCHMAKING_TIME = 1.0  # seconds before a round's start that replicas look for each other
LOCK_WAIT = 30.0  # seconds past a round's timeout the node waits for the averager's tensors
FP16_FROM = 2**14  # elements: smaller tensors (norms, biases) are sent exactly, they cost nothing


def averaging_prefix(run: str, stage: int) -> str:
    return f"{run.replace('.', '_')}_stage{stage}"  # hivemind prefixes may not contain dots


def next_round(period: float, now: float | None = None, lead: float = MATCHMAKING_TIME + 0.25) -> float:
    """The next round's start at least `lead` s ahead: a multiple of `period` in DHT time, so every
    replica picks the same one."""
    now = get_dht_time() if now is None else now
    at = (math.floor(now / period) + 1) * period
    while at - now <= lead:
        at += period
    return at


class AveragerStuck(Exception):
    """hivemind's averager process kept its tensors locked past any round's end (a cancelled
    all-reduce can leave its lock taken): this averager cannot be used again."""


class StageAverager:
    """One stage's hivemind averager, over a copy of its trainable parameters."""

    def __init__(
        self,
        worker: StageWorker,
        dht: DHT,
        run: str,
        gate: AveragingGate,
        *,
        compression: Literal["none", "float16"] = "float16",
        timeout: float = 10.0,
    ):
        self.worker = worker
        self.params = [p for p in worker.stage.parameters() if p.requires_grad]
        self.before = [p.detach().clone() for p in self.params]
        comp = (
            SizeAdaptiveCompression(FP16_FROM, less=NoCompression(), greater_equal=Float16Compression())
            if compression == "float16"
            else NoCompression()
        )
        self.timeout = timeout
        self.averager = GuardedAverager(
            [p.detach().clone() for p in self.params],
            dht,
            start=True,
            prefix=averaging_prefix(run, worker.index),
            min_matchmaking_time=MATCHMAKING_TIME,
            request_timeout=MATCHMAKING_TIME / 2,
            compression=comp,
            allreduce_timeout=timeout,
            allow_state_sharing=False,  # a joining replica copies state over pmnode's own {run}.state call
            gate=gate,
        )

    @contextlib.contextmanager
    def _tensors(self) -> Iterator[Sequence[torch.Tensor]]:
        """hivemind's get_tensors, with a bounded wait for its lock instead of a hang."""
        lock = self.averager.lock_averaged_tensors
        if not lock.acquire(timeout=self.timeout + LOCK_WAIT):
            raise AveragerStuck("hivemind's averager kept its tensors locked")
        try:
            yield self.averager._averaged_tensors
        finally:
            lock.release()

    def snapshot(self) -> None:
        """Compute thread: what this replica brings to the round."""
        with self._tensors() as tensors:
            for t, b, p in zip(tensors, self.before, self.params, strict=True):
                t.copy_(p.detach())
                b.copy_(p.detach())

    def start_round(
        self, at: float, weight: float, cert: Cert, leaders: list[str], final: bool = False
    ) -> Any:
        """Join the round that starts at `at`, following only one of `leaders` (certified replicas) if
        anyone; returns hivemind's StepControl (a future)."""
        self.averager.admit_leaders(leaders)
        return self.averager.step(
            gather={"cert": cert.model_dump(mode="json"), "final": final},
            scheduled_time=at,
            weight=max(float(weight), 1.0),
            timeout=at - get_dht_time() + self.timeout,
            allow_retries=False,
            wait=False,
        )

    @staticmethod
    def members(group: dict[PeerID, Any], verifier: Verifier, stage: int) -> list[str]:
        """Every participant's peer id, if each showed a valid certificate for `stage`; AuthError if not."""
        peers = []
        for peer_id, data in group.items():
            peer = peer_id.to_base58()
            try:
                cert = Cert.model_validate(data["cert"])
            except Exception as e:
                raise AuthError("bad certificate", f"{peer[-8:]} sent no certificate to the round") from e
            verifier.check_cert(cert, peer_id=peer, stage=stage)
            peers.append(peer)
        return sorted(peers)

    def apply(self) -> bool:
        """Compute thread: add (average - snapshot) to the live weights; False if the result is unusable."""
        with self._tensors() as tensors:
            deltas = [t - b for t, b in zip(tensors, self.before, strict=True)]
        if not all(torch.isfinite(d).all() for d in deltas):
            return False
        with torch.no_grad():
            for p, d in zip(self.params, deltas, strict=True):
                p.add_(d.to(p.device, p.dtype))
            self.worker.stage.project_()  # fp16 rounding must not leak outside span(U)
        return True

    def shutdown(self) -> None:
        self.averager.shutdown()
