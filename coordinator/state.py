"""What the coordinator keeps on disk between starts (`--state-dir/state.json`), and its history.

Membership is not restored from it (the nodes' heartbeats in the DHT rebuild that); it keeps the port,
so volunteers' bootstrap addresses stay valid, the global step and the loss history for the page.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pmnode.core.durable import atomic_write
from pmnode.errors import PmnodeError
from pmnode.net.routing import StageRecord
from pmnode.net.status import HistoryPoint, thin


class SavedState(BaseModel):
    run: str
    fingerprint: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    port: int = 0
    maddrs: list[str] = Field(default_factory=list)
    global_step: int = 0
    members: dict[int, list[StageRecord]] = Field(default_factory=dict)  # for a reader; not restored
    history: list[HistoryPoint] = Field(default_factory=list)
    time: float = Field(default_factory=time.time)


def load_state(path: Path, run: str, fingerprint: str | None) -> SavedState | None:
    """The last start's state, or None on a first start; another run's state is a user mistake."""
    if not path.exists():
        return None
    try:
        state = SavedState.model_validate_json(path.read_text())
    except ValueError as e:
        what = f"{path} is not a coordinator state file ({e.__class__.__name__})"
        raise PmnodeError(f"{what}; move it away or use another --state-dir") from e
    if state.fingerprint != fingerprint or state.run != run:
        raise PmnodeError(
            f"{path.parent} holds state of another run ({state.run}, fingerprint {state.fingerprint}); "
            "use another --state-dir"
        )
    return state


def save_state(path: Path, state: SavedState) -> None:
    # fsynced, then renamed: a crash or power cut never leaves half (or none) of a state file
    atomic_write(path, lambda p: p.write_text(state.model_dump_json(indent=2)), path.with_suffix(".tmp"))


def head_of(members: dict[int, list[StageRecord]]) -> StageRecord | None:
    """The head replica furthest along: it sees the loss (the tail's reply) and drives the data."""
    heads = members.get(0, [])
    return max(heads, key=lambda r: (r.step, r.peer_id)) if heads else None


def extend_history(history: list[HistoryPoint], head: StageRecord | None) -> list[HistoryPoint]:
    """The history with the head's newest loss added, if it is new, thinned to a bounded length."""
    if head is None or head.loss is None:
        return history
    if history and head.step <= history[-1].step:
        return history
    point = HistoryPoint(step=head.step, loss=head.loss, heldout_loss=head.heldout_loss, time=time.time())
    return thin([*history, point])
