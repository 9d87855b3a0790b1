"""What one machine chooses for its node: `pmnode join`'s flags, which are made from these fields
(pmnode.cli.fields: the name, type, default and help each flag shows)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from pmnode.config import MachineConfig
from pmnode.swarm.panel import LogFormat


class NodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coordinator: str = Field(description="The multiaddr `coordinator serve` printed.")
    stage: int | None = Field(None, ge=0, description="Serve this stage; default: the coordinator picks.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    announce: list[str] = Field(
        default_factory=list, max_length=8, description="Multiaddr others should dial (behind NAT)."
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Save this stage here; --resume loads from it, and so does a node that takes over an "
        "empty stage mid-run.",
    )
    machine: MachineConfig = MachineConfig()  # device, threads, bf16, this machine's corpus copy
    connect_timeout: float = 30.0
    resume: bool = Field(False, description="Continue this stage from its checkpoint in --checkpoint-dir.")
    checkpoint_every: int = Field(
        0, ge=0, description="Also checkpoint every N optimizer steps (0: only on exit)."
    )
    log_format: LogFormat = Field(
        "text", description="text: a live panel on a terminal, plain lines otherwise; json: JSON lines."
    )
    link_bandwidth: float | None = Field(
        None,
        gt=0,
        description="Emulate this bandwidth on every outgoing link, e.g. 80mbit, 1gbit; or unlimited.",
    )  # bytes/s; None: unshaped
    link_latency: float = Field(
        0.0, ge=0, description="Emulate this one-way latency on every link, e.g. 50ms."
    )  # seconds
    token: SecretStr | None = None  # the run's join token; never printed
    fresh_weights: bool = Field(
        False,
        description="If this stage has no node and the swarm is past step 0, start it from random weights "
        "instead of refusing to join without a checkpoint.",
    )
    relay: bool = Field(
        False,
        description="Relay traffic for members behind NAT (when this node is reachable and the operator "
        "named it: coordinator serve --relay-peer ID).",
    )
