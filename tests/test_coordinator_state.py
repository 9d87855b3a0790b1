"""The coordinator's state file and loss history: pure functions, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.state import SavedState, extend_history, head_of, load_state, save_state
from pmnode.errors import PmnodeError
from pmnode.net.routing import StageRecord
from pmnode.net.status import HistoryPoint


def _head(peer: str, step: int, loss: float | None) -> StageRecord:
    return StageRecord(peer_id=peer, stage=0, step=step, loss=loss)


def test_state_round_trips_and_refuses_another_run(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert load_state(path, "tiny", "abc") is None  # a first start
    members = {0: [_head("Qm1", 7, 2.5)]}
    saved = SavedState(run="tiny", fingerprint="abc", port=4242, global_step=7, members=members)
    save_state(path, saved)
    back = load_state(path, "tiny", "abc")
    assert back == saved and back.members[0][0].step == 7
    assert not path.with_suffix(".tmp").exists()
    with pytest.raises(PmnodeError, match=r"another run \(tiny, fingerprint abc\)"):
        load_state(path, "tiny", "other")
    path.write_text("{not json")
    with pytest.raises(PmnodeError, match="not a coordinator state file"):
        load_state(path, "tiny", "abc")


def test_history_follows_the_furthest_head() -> None:
    assert head_of({}) is None
    members = {0: [_head("Qm1", 5, 3.0), _head("Qm2", 9, 2.0)], 1: [StageRecord(peer_id="Qm3", stage=1)]}
    head = head_of(members)
    assert head is not None and head.peer_id == "Qm2"
    history = extend_history([], head)
    assert [(h.step, h.loss) for h in history] == [(9, 2.0)]
    assert extend_history(history, head) is history  # the same step twice adds nothing
    assert extend_history(history, _head("Qm1", 12, None)) is history  # no loss yet
    long = [HistoryPoint(step=i, loss=1.0, time=0.0) for i in range(5000)]
    assert len(extend_history(long, _head("Qm2", 6000, 1.0))) < len(long)  # thinned, bounded


def test_status_and_metrics_show_every_head() -> None:
    """Two heads: the status lists both with their slots, tokens/s is theirs together, /metrics has a
    series per head."""
    from prometheus_client import generate_latest

    from coordinator.http import Metrics
    from coordinator.view import swarm_status
    from pmnode.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml").with_overrides(
        n_stages=2, swarm={"heads": 2}
    )
    heads = [
        StageRecord(peer_id="QmA", stage=0, slot=0, step=5, tokens_per_s=100.0, samples=80),
        StageRecord(peer_id="QmB", stage=0, slot=1, step=5, tokens_per_s=120.0, samples=80),
    ]
    members = {0: heads, 1: [StageRecord(peer_id="QmC", stage=1, step=5)]}
    s = swarm_status(cfg, None, members=members, shown=members, history=[], global_step=5, coordinator=[])
    assert s.heads == 2 and s.tokens_per_s == 220.0
    assert [(r.peer_id, r.slot) for r in s.stages[0].replicas] == [("QmA", 0), ("QmB", 1)]
    m = Metrics()
    m.update(s)
    text = generate_latest(m.registry).decode()
    assert "pmnode_heads 2.0" in text
    assert 'pmnode_head_tokens_per_second{peer="QmB",slot="1"} 120.0' in text
