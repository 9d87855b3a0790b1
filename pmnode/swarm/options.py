"""What one machine chooses for its node: `pmnode join`'s flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from pmnode.config import MachineConfig
from pmnode.swarm.panel import LogFormat


class NodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coordinator: str
    stage: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    announce: list[str] = []
    checkpoint_dir: Path | None = None
    machine: MachineConfig = MachineConfig()  # device, threads, bf16, this machine's corpus copy
    connect_timeout: float = 30.0
    resume: bool = False
    checkpoint_every: int = 0  # steps between checkpoints; 0: only on exit
    log_format: LogFormat = "text"
    link_bandwidth: float | None = None  # bytes/s on each emulated outgoing link; None: unshaped
    link_latency: float = 0.0  # seconds, one way
    token: SecretStr | None = None  # the run's join token; never printed
    fresh_weights: bool = False  # may start an empty stage mid-run from random weights
    relay: bool = False  # relay circuits for members behind NAT (needs this node to be reachable)
