"""Steady-state throughput from a head's per-step lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmnode.bench_swarm import head_lines, steady_rate, window_rates


def lines(rates: list[float], window: int = 2, tokens: int = 100) -> list[dict]:
    """Per-step lines whose windows of `window` steps run at the given tokens/s."""
    out, t, tok = [{"step": 0, "tokens": 0, "elapsed": 0.0}], 0.0, 0
    for r in rates:
        for _ in range(window):
            tok += tokens
            t += tokens / r
            out.append({"step": len(out), "tokens": tok, "elapsed": t})
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
    log.write_text("node abc serves stage 0\n" + "\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    assert head_lines(log) == rows
