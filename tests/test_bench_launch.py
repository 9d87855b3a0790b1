"""benchmarks.launch: its readers read back what pmnode writes; `Processes` stops what it started."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.churn import windows
from benchmarks.launch import HeadSpotChecks, Processes, node_summaries
from pmnode.swarm.report import Averaging, NodeSummary, StepLine


def _summary(stage: int, steps: int) -> NodeSummary:
    return NodeSummary(
        stage=stage,
        steps=steps,
        schedule="sync",
        codec="dense",
        samples_applied=8 * steps,
        client={},
        server={},
        rejected={},
        bans=0,
        dropped_gradients=0,
        reissued=1,
        samples_off=0,
        steps_lost=0,
        paused_s=0.0,
        averaging=Averaging(rounds=2),
        spot_checks={"counts": {"agree": 3}, "banned": {"liar": 4}, "served_until_ban": {"liar": 17}},
    )


def test_node_summaries_read_what_join_writes(tmp_path: Path) -> None:
    for name, stage, steps in (("node-0", 0, 5), ("node-1-2", 1, 4)):
        # as `pmnode join --summary-json` writes it
        (tmp_path / f"{name}.json").write_text(_summary(stage, steps).model_dump_json(exclude_none=True))
    (tmp_path / "swarm.json").write_text("{}")  # not a node's
    nodes = node_summaries(tmp_path)
    assert sorted(nodes) == ["node-0", "node-1-2"]
    assert (nodes["node-1-2"].stage, nodes["node-1-2"].steps, nodes["node-1-2"].samples_applied) == (1, 4, 32)
    assert nodes["node-0"].averaging.rounds == 2
    spot = HeadSpotChecks.model_validate(nodes["node-0"].spot_checks)
    assert spot.served_until_ban == {"liar": 17} and "liar" in spot.banned


def test_churn_windows_from_step_lines() -> None:
    lines = [StepLine(step=i, loss=1.0, tokens_per_s=0.0, tokens=500 * i, elapsed=5.0 * i) for i in range(5)]
    assert windows(lines, 10.0) == [(10.0, 100.0), (20.0, 100.0)]


def test_processes_stops_what_it_started(tmp_path: Path) -> None:
    with Processes(tmp_path, grace=2.0) as procs:
        p = procs.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], stage=1)
        assert procs.live(1) == [p] and procs.live(0) == []
    assert p.p.returncode is not None and procs.live(1) == []
    assert procs.summary("sleeper") is None  # it wrote none
