"""Steady-state throughput from a head's per-step lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmnode.bench.swarm import head_lines, steady_rate, window_rates
from pmnode.swarm.report import StepLine


def _line(step: int, tokens: int, elapsed: float) -> StepLine:
    return StepLine(step=step, loss=1.0, tokens_per_s=0.0, tokens=tokens, elapsed=elapsed)


def lines(rates: list[float], window: int = 2, tokens: int = 100) -> list[StepLine]:
    """Per-step lines whose windows of `window` steps run at the given tokens/s."""
    out, t, tok = [_line(0, 0, 0.0)], 0.0, 0
    for r in rates:
        for _ in range(window):
            tok += tokens
            t += tokens / r
            out.append(_line(len(out), tok, t))
    return out


def test_window_rates() -> None:
    assert window_rates(lines([100, 200, 400]), window=2) == pytest.approx([100, 200, 400])


def test_steady_after_warmup_is_the_median_from_there() -> None:
    rate, steady, first = steady_rate([50, 80, 100, 102, 99, 101, 130])
    assert steady and first == 2 and rate == pytest.approx(101)


def test_never_steady_falls_back_to_the_last_half() -> None:
    rate, steady, first = steady_rate([10, 20, 40, 80])
    assert not steady and first == -1 and rate == pytest.approx(60)
    assert steady_rate([]) == (0.0, False, -1)


def test_head_lines_skip_other_output(tmp_path: Path) -> None:
    log = tmp_path / "node-0.log"
    rows = lines([100, 100])
    log.write_text("node abc serves stage 0\n" + "\n".join(r.json_line() for r in rows) + "\n{broken\n")
    assert head_lines(log) == rows


def test_tokens_to_reach_interpolates() -> None:
    from pmnode.bench.time_to_loss import tokens_to_reach

    curve = [[100, 3.0], [200, 2.0], [300, 1.5]]
    assert tokens_to_reach(curve, 2.5) == pytest.approx(150)
    assert tokens_to_reach(curve, 3.0) == 100
    assert tokens_to_reach(curve, 1.0) is None


def test_time_to_loss_joins_convergence_and_swarm(tmp_path: Path) -> None:
    from pmnode.bench.time_to_loss import time_to_loss
    from pmnode.errors import PmnodeError

    conv, swarm = tmp_path / "conv", tmp_path / "swarm"
    conv.mkdir()
    swarm.mkdir()
    conv_runs = [
        {"codec": "dense", "heldout_loss": 2.0, "curve": [[100, 3.0], [200, 2.0]]},
        {"codec": "subspace@16", "heldout_loss": 1.8, "curve": [[100, 2.5], [200, 1.8]]},
    ]
    (conv / "results.json").write_text(json.dumps({"runs": conv_runs}))
    swarm_runs = [
        {"codec": "dense", "bandwidth": "80mbit", "latency_ms": 50, "tokens_per_s": 10.0},
        {"codec": "subspace@16", "bandwidth": "80mbit", "latency_ms": 50, "tokens_per_s": 40.0},
    ]
    (swarm / "results.json").write_text(json.dumps({"runs": swarm_runs}))
    out = tmp_path / "out"
    r = time_to_loss(
        conv, swarm, codecs=["dense", "subspace@16"], bandwidth="80mbit", target=None, out=out, command="x"
    )
    dense, sub = r["runs"]
    assert dense["target_loss"] == 2.0  # the worst final loss: both reach it
    assert dense["seconds_to_target"] == pytest.approx(200 / 10)
    assert sub["tokens_to_target"] == pytest.approx(100 + 100 * 0.5 / 0.7)
    assert sub["seconds_to_target"] == pytest.approx(sub["tokens_to_target"] / 40)
    assert (out / "results.md").exists() and (out / "time_to_loss.png").exists()
    with pytest.raises(PmnodeError, match="no swarm run"):
        time_to_loss(conv, swarm, codecs=["dense"], bandwidth="20mbit", target=None, out=out, command="x")
