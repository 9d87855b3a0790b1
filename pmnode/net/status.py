"""Swarm status: the schema the coordinator serves (RPC, /status) and its terminal rendering.

The coordinator builds it from the heartbeats nodes announce in the DHT; `pmnode status`
and the HTTP endpoint show the same object, so the JSON a script reads is the table a
person sees.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.table import Table

from pmnode.errors import PmnodeError
from pmnode.net.dht import p2p_options
from pmnode.net.routing import StageRecord

STATUS_RPC = "pmnode.coord.status"  # fixed name, like JOIN_RPC: asked before the run is known
HISTORY_LIMIT = 2000  # points of loss history kept; older ones are thinned, never the latest


class StatusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the page's token, when the coordinator protects its page (--http-token-file): the status over
    # libp2p tells no more than the page does
    token: str = Field("", max_length=256, repr=False)


class Replica(StageRecord):
    """One node as the coordinator last saw it."""

    last_seen_s: float = Field(description="Seconds since this node's last heartbeat.")


class StageStatus(BaseModel):
    stage: int
    role: str = Field(description="head, body or tail.")
    layers: tuple[int, int] = Field(description="Global layer range [start, stop).")
    replicas: list[Replica]
    throughput: float = Field(description="Summed samples/s of the stage's online replicas.")


class HistoryPoint(BaseModel):
    step: int
    loss: float | None = None
    heldout_loss: float | None = None
    time: float


class SwarmStatus(BaseModel):
    run: str
    fingerprint: str | None
    d_model: int
    compression_rank: int | None
    codec: str
    schedule: str
    n_stages: int
    heads: int = Field(1, description="Head slots (swarm.heads): stage-0 nodes driving at once.")
    target_steps: int
    global_step: int
    loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float = 0.0
    wire_bytes_per_s: float = 0.0
    stages: list[StageStatus]
    history: list[HistoryPoint] = []
    coordinator: list[str] = Field(default=[], description="The coordinator's multiaddrs, to join with.")
    time: float

    @property
    def empty_stages(self) -> list[int]:
        return [s.stage for s in self.stages if not s.replicas]


def thin(history: list[HistoryPoint], limit: int = HISTORY_LIMIT) -> list[HistoryPoint]:
    """Keep a long curve bounded: drop every other old point, keep the newest half intact."""
    if len(history) <= limit:
        return history
    half = len(history) - limit // 2
    return history[:half:2] + history[half:]


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def render(status: SwarmStatus, console: Console) -> None:
    """Stages x replicas as a table, with the run's headline numbers above it."""
    s = status
    k = f"k={s.compression_rank}" if s.compression_rank else "dense"
    console.print(
        f"run [bold]{s.run}[/]  d={s.d_model} {k}  codec {s.codec}  {s.schedule}  "
        f"step [bold]{s.global_step}[/]/{s.target_steps}  loss {_num(s.loss)}  "
        f"held-out {_num(s.heldout_loss)}  {s.tokens_per_s:,.0f} tok/s",
        highlight=False,
    )
    table = Table(
        "stage", "layers", "peer", "state", "device", "samples/s", "queue", "step", "refused", "last seen"
    )
    now = time.time()
    for st in s.stages:
        layers = f"{st.layers[0]}..{st.layers[1] - 1} ({st.role})"
        if not st.replicas:
            table.add_row(str(st.stage), layers, "[red]no replica[/]", "", "", "", "", "", "", "")
        for i, r in enumerate(st.replicas):
            table.add_row(
                str(st.stage) if i == 0 else "",
                layers if i == 0 else "",
                r.peer_id[-12:] + (f" (head {r.slot})" if st.stage == 0 and s.heads > 1 else ""),
                r.state,
                r.device,
                f"{r.throughput:.1f}",
                str(r.queue),
                str(r.step),
                str(sum(r.refused.values())),
                _age(max(now - r.time, 0.0) if r.time else r.last_seen_s),
            )
    console.print(table)
    if s.empty_stages:
        console.print(f"[red]stages {s.empty_stages} have no node: training waits for a volunteer[/]")
    for st in s.stages:  # one line per node whose operator must act (a full disk: no checkpoints)
        for r in st.replicas:
            if r.problem:
                where = f"stage {st.stage}, peer {r.peer_id[-12:]}"
                console.print(f"[red]{where}: {r.problem}[/]", highlight=False)


async def _fetch(maddr: str, peer: str, timeout: float, token: str) -> SwarmStatus:
    from hivemind.p2p import P2P

    from pmnode.net.control import ControlError, call_json
    from pmnode.net.tunnel import Tunnel

    host = maddr.split("/")[2] if maddr.startswith("/ip") else "0.0.0.0"
    # A bare libp2p client: no DHT, no listening port, gone when the call is answered.
    p2p = await P2P.create(initial_peers=[maddr], host_maddrs=[], **p2p_options(host))
    try:
        return await call_json(
            Tunnel(p2p), peer, STATUS_RPC, StatusRequest(token=token), SwarmStatus, timeout
        )
    except ControlError as e:
        if e.reason == "unauthorized":
            raise PmnodeError(
                "the coordinator's status needs its HTTP token: pass --http-token-file PATH "
                "(the file `coordinator serve --http-token-file` reads)"
            ) from e
        raise PmnodeError(f"the coordinator did not give its status: {e}") from e
    finally:
        await p2p.shutdown()


def fetch_status(maddr: str, timeout: float = 15.0, token: str = "") -> SwarmStatus:
    """Ask a coordinator (by the multiaddr it printed) for the swarm's status (`token`: its page's)."""
    from pmnode.net.control import coordinator_peer

    peer = coordinator_peer(maddr)
    try:
        return asyncio.run(asyncio.wait_for(_fetch(maddr, peer, timeout, token), timeout + 5))
    except asyncio.TimeoutError:
        raise PmnodeError(f"no answer from the coordinator at {maddr} within {timeout:.0f}s") from None
    except PmnodeError:
        raise
    except Exception as e:  # p2pd refusing the address, a dead peer: one line, not a traceback
        raise PmnodeError(f"could not reach the coordinator at {maddr}: {e}") from e
