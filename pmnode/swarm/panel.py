"""What a volunteer sees while `pmnode join` runs: a live rich panel, plain lines, or JSON lines.

The node fills a NodeSnapshot every tick; how it is shown depends on where the output goes:
a terminal gets the panel, a pipe or log file gets a plain line every few seconds, and
`--log-format json` gets one JSON object per line for machines.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

LogFormat = Literal["text", "json"]


class NodeSnapshot(BaseModel):
    run: str
    peer_id: str
    stage: int
    n_stages: int
    layers: tuple[int, int]
    role: str
    device: str
    codec: str
    schedule: str
    upstream: list[str]
    downstream: list[str]
    step: int
    target_steps: int
    samples: int
    loss: float | None
    heldout_loss: float | None
    tokens_per_s: float
    bytes_in_per_s: float
    bytes_out_per_s: float
    compression: float  # dense fp32 bytes over this codec's bytes, per token and boundary
    inflight: int
    errors: int
    uptime_s: float
    problem: str | None = None  # one line the operator must see, e.g. checkpoints failing on a full disk


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB/s" if x >= 1e4 else f"{x / 1e3:.1f} kB/s"


def _peers(peers: list[str]) -> str:
    return ", ".join(p[-8:] for p in peers) if peers else "-"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render(s: NodeSnapshot) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    grid.add_column(style="dim", justify="right")
    grid.add_column()
    grid.add_row(
        "stage",
        f"[bold]{s.stage}[/]/{s.n_stages - 1} ({s.role}), layers {s.layers[0]}..{s.layers[1] - 1}",
        "device",
        s.device,
    )
    grid.add_row("upstream", _peers(s.upstream), "downstream", _peers(s.downstream))
    grid.add_row("step", f"[bold]{s.step}[/]/{s.target_steps}", "samples", f"{s.samples:,}")
    grid.add_row("loss", _loss(s.loss), "held-out", _loss(s.heldout_loss))
    grid.add_row("tokens/s", f"{s.tokens_per_s:,.0f}", "in flight", str(s.inflight))
    grid.add_row("in", _mb(s.bytes_in_per_s), "out", _mb(s.bytes_out_per_s))
    grid.add_row("compression", f"{s.compression:.1f}x vs dense fp32", "codec", f"{s.codec}, {s.schedule}")
    if s.problem:
        grid.add_row("[red]problem[/]", f"[red]{s.problem}[/]", "", "")
    footer = f"peer {s.peer_id[-12:]}, up {s.uptime_s:.0f}s" + (f", {s.errors} errors" if s.errors else "")
    return Panel(Group(grid), title=f"pmnode · run {s.run}", subtitle=footer, expand=False)


def line(s: NodeSnapshot) -> str:
    return (
        f"stage {s.stage} step {s.step}/{s.target_steps} samples {s.samples} loss {_loss(s.loss)} "
        f"held-out {_loss(s.heldout_loss)} {s.tokens_per_s:,.0f} tok/s in {_mb(s.bytes_in_per_s)} "
        f"out {_mb(s.bytes_out_per_s)} inflight {s.inflight} up {_peers(s.upstream)} "
        f"down {_peers(s.downstream)}" + (f" PROBLEM: {s.problem}" if s.problem else "")
    )


class Display:
    """Shows snapshots: a Live panel on a terminal, else a line (text or JSON) every `every` seconds."""

    def __init__(self, console: Console, log_format: LogFormat = "text", every: float = 5.0) -> None:
        self.console, self.format, self.every = console, log_format, every
        self.live: Live | None = None
        self._last = 0.0

    @property
    def interactive(self) -> bool:
        return self.format == "text" and self.console.is_terminal

    def show(self, s: NodeSnapshot, force: bool = False) -> None:
        if self.interactive:
            if self.live is None:
                self.live = Live(render(s), console=self.console, refresh_per_second=4, transient=False)
                self.live.start()
            else:
                self.live.update(render(s))
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        if self.format == "json":
            self.console.out(json.dumps({"event": "status", **s.model_dump()}), highlight=False)
        else:
            self.console.print(line(s), highlight=False, soft_wrap=True)

    def close(self, s: NodeSnapshot | None = None) -> None:
        if s is not None:
            self.show(s, force=True)
        if self.live is not None:
            self.live.stop()
            self.live = None
