"""What each k costs: bytes by formula, the link's fit, and the measured costs by d/k."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pmnode.bench import advice
from pmnode.bench.advice import MeasuredCost, advise, recommended
from pmnode.config import load_config

BIN = Path(sys.executable).parent


def test_bytes_and_the_largest_k_the_link_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("deep")  # d = 256, byte tokens, k = d/32 = 8
    cost = MeasuredCost(
        d_over_k=32,
        d_model=128,
        rank=4,
        variant="subspace@4",
        corpus="stdlib",
        tokens=5_000_000,
        complete=True,
        gap=0.2,
        gap_plain=0.2,
        steps_ratio=None,
    )
    monkeypatch.setattr(advice, "measured_costs", lambda: [cost])
    rows = {r.rank: r for r in advise(cfg, bandwidth=10e6, tokens_per_s=100_000)}
    assert sorted(rows) == [4, 8, 16, 32, 64]
    assert rows[8].bytes_per_token == 4 * 8 + 1 and rows[8].bytes_per_token_int8 == 8 + 2 + 1
    # 10 MB/s (80 Mbit/s) over 33 B/token carries 303,030 tokens/s; at 129 B/token only 77,519.
    assert rows[8].link_tokens_per_s == pytest.approx(10e6 / 33, abs=0.1)
    assert rows[16].fits and not rows[32].fits
    assert recommended(list(rows.values())).rank == 16
    assert rows[8].measured == [cost] and rows[16].measured == []  # matched by d/k, from d = 128


def test_inspect_prints_the_compression_table_as_json() -> None:
    out = subprocess.run(
        [
            str(BIN / "coordinator"),
            "inspect",
            "--config",
            "deep",
            "--json",
            "--bandwidth",
            "80mbit",
            "--tokens-per-s",
            "100000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [c["rank"] for c in info["compression"]] == [4, 8, 16, 32, 64]
    assert info["recommended_rank"] == 16
    bad = subprocess.run(
        [str(BIN / "coordinator"), "inspect", "--config", "deep", "--bandwidth", "fast"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "bad bandwidth" in bad.stderr and "Traceback" not in bad.stderr
