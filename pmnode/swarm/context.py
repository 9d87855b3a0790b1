"""What every role of a node shares: the run's config, this node's identity and stage, the runner."""

from __future__ import annotations

from dataclasses import dataclass

from hivemind import DHT
from hivemind.p2p import P2P
from rich.console import Console

from pmnode.config import RunConfig
from pmnode.net.auth import Verifier
from pmnode.net.meta import AckMeta, Meta
from pmnode.net.tunnel import Tunnel
from pmnode.net.wire import MessageHeader
from pmnode.swarm.runner import StageRunner
from pmnode.swarm.schedule import Schedule


@dataclass
class NodeContext:
    cfg: RunConfig
    schedule: Schedule
    dht: DHT
    p2p: P2P
    tunnel: Tunnel  # the one of p2p: every pmnode handler and call goes through it (net.tunnel)
    peer_id: str
    verifier: Verifier
    runner: StageRunner
    console: Console
    slot: int = 0  # a head's slot (certified by the coordinator): its part of the data order

    @property
    def stage(self) -> int:
        return self.runner.worker.index

    def header(self, micro_batch: str, meta: Meta | None = None) -> MessageHeader:
        """A message from this stage at its current step, of `meta`'s kind (an ack without one)."""
        return MessageHeader.of(
            meta if meta is not None else AckMeta(),
            run=self.cfg.name,
            micro_batch=micro_batch,
            stage=self.stage,
            step=self.runner.step,
            sender=self.peer_id,
        )

    def say(self, text: str) -> None:
        self.console.print(f"stage {self.stage}: {text}", markup=False)
