"""What each k costs: bytes by formula, the link's fit, and the measured costs by d/k."""

from __future__ import annotations

import json

import pytest
from cli_runner import coordinator

from pmnode.config import load_config
from pmnode.plan import advice
from pmnode.plan.advice import MeasuredCost, advise, recommended


def _cost(d_over_k: int, gap: float, codec: str = "subspace", setting: str = "paper") -> MeasuredCost:
    return MeasuredCost(
        d_over_k=d_over_k,
        d_model=128,
        rank=128 // d_over_k,
        variant=f"{codec}@{128 // d_over_k}",
        codec=codec,
        setting=setting,
        corpus="stdlib",
        tokens=5_000_000,
        complete=True,
        gap=gap,
        gap_plain=gap,
        steps_ratio=None,
    )


def test_bytes_and_the_largest_k_the_link_carries(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("deep")  # d = 256, byte tokens, k = d/32 = 8
    cost = _cost(32, 0.2)
    monkeypatch.setattr(advice, "measured_costs", lambda: [cost])
    rows = {r.rank: r for r in advise(cfg, bandwidth=10e6, tokens_per_s=100_000)}
    assert sorted(rows) == [4, 8, 16, 32, 64]
    assert rows[8].bytes_per_token == 4 * 8 + 1
    # 10 MB/s (80 Mbit/s) over 33 B/token carries 303,030 tokens/s; at 129 B/token only 77,519.
    assert rows[8].link_tokens_per_s == pytest.approx(10e6 / 33, abs=0.1)
    assert rows[16].fits and not rows[32].fits
    # Measured only where it is no better than a larger k: the largest fp32 k the link carries.
    assert recommended(list(rows.values())).rank == 16
    assert rows[8].measured == cost and rows[16].measured is None  # matched by d/k, from d = 128


def test_the_lowest_measured_cost_the_link_carries_is_recommended(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("deep")
    remedy = "constrain=boundaries, stage_bigrams=4096"
    costs = [
        _cost(32, 0.16),
        _cost(8, 0.08, "subspace:int8"),
        _cost(8, 0.02, "subspace:int8", remedy),
        _cost(32, 0.01, setting="constrain=boundaries, n_stages=2"),  # fewer stages: shown only
        _cost(2, 0.0, "subspace:int8"),  # 128 + 3 B/token: the link does not carry it
    ]
    monkeypatch.setattr(advice, "measured_costs", lambda: costs)
    rows = advise(cfg, bandwidth=10e6, tokens_per_s=100_000)
    assert rows[0].shipped  # the config's own boundary leads, then the cheapest on the wire
    assert [r.bytes_per_token for r in rows[1:]] == sorted(r.bytes_per_token for r in rows[1:])
    int8 = {r.setting: r for r in rows if r.codec == "subspace:int8" and r.rank == 32}
    assert int8[remedy].bytes_per_token == 32 + 2 + 1 and int8[remedy].measured == costs[2]
    best = recommended(rows)
    assert (best.codec, best.rank, best.setting) == ("subspace:int8", 32, remedy)


def test_inspect_prints_the_compression_table_as_json() -> None:
    out = coordinator(
        "inspect", "--config", "deep", "--json", "--bandwidth", "80mbit", "--tokens-per-s", "100000"
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    rows = info["compression"]
    assert {c["rank"] for c in rows if c["codec"] == "subspace" and c["setting"] == "paper"} >= {
        4,
        8,
        16,
        32,
        64,
    }
    best = info["recommended"]
    assert best is not None and best["fits"] and best["bytes_per_token"] <= 10e6 / 100_000
    measured = [c for c in rows if c["fits"] and c["measured"] and c["measured"]["complete"]]
    measured = [c for c in measured if c["measured"]["gap"] is not None and "n_stages" not in c["setting"]]
    if measured:  # the shipped costs: the lowest measured gap among what fits
        assert best["measured"]["gap"] == min(c["measured"]["gap"] for c in measured)
    bad = coordinator("inspect", "--config", "deep", "--bandwidth", "fast")
    assert bad.returncode != 0 and "bad bandwidth" in bad.stderr and "Traceback" not in bad.stderr


def test_the_shipped_boundary_leads_with_its_spread_over_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("deep")  # shipped: the remedy preset, int8 at k = d/8 = 32
    stdlib = _cost(8, 0.009, "subspace:int8", "remedy")
    prose = stdlib.model_copy(update={"corpus": "prose-v2", "gap": 0.03})
    short = stdlib.model_copy(update={"corpus": "perldoc-v3", "gap": 0.02, "tokens": 2_000_000})
    monkeypatch.setattr(advice, "measured_costs", lambda: [_cost(32, 0.16), stdlib, prose, short])
    rows = advise(cfg, bandwidth=10e6, tokens_per_s=100_000)
    first = rows[0]
    assert first.shipped and (first.codec, first.rank, first.setting) == ("subspace:int8", 32, "remedy")
    assert [m.corpus for m in first.spread] == ["stdlib", "perldoc-v3", "prose-v2"]  # lowest gap first
    assert advice.spread_text(first) == "+0.9% (stdlib, 5.0M) to +3.0% (prose-v2, 5.0M), 3 corpora"
    assert sum(r.shipped for r in rows) == 1
    # llama-8b ships the remedy without the 128K x d token table: a setting of its own, not measured.
    big = advise(load_config("llama-8b"))[0]
    assert big.shipped and big.setting == "remedy, stage_embeddings=false, stage_bigrams=16384"
