"""What one machine chooses for its node: `pmnode join`'s flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from pmnode.swarm.panel import LogFormat


class NodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coordinator: str
    stage: int | None = None
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0
    announce: list[str] = []
    data: str | None = None  # this machine's copy of the corpus (the head reads it)
    checkpoint_dir: Path | None = None
    bf16: bool = False
    threads: int | None = None  # torch threads on this machine; None: the run's swarm.threads
    connect_timeout: float = 30.0
    resume: bool = False
    checkpoint_every: int = 0  # steps between checkpoints; 0: only on exit
    log_format: LogFormat = "text"
    link_bandwidth: float | None = None  # bytes/s on each emulated outgoing link; None: unshaped
    link_latency: float = 0.0  # seconds, one way
    token: SecretStr | None = None  # the run's join token; never printed
    fresh_weights: bool = False  # may start an empty stage mid-run from random weights
