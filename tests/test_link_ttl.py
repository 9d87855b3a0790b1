"""`pmnode bench time-to-loss --config`: the runs it makes, in what order, and the time-to-target
figures it derives, with a fake runner in place of local swarms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmnode.bench import link_ttl
from pmnode.config import RunConfig
from pmnode.errors import PmnodeError

# Held-out curves [step, wall seconds, loss]: sync is slow over the link, async is not.
CURVES = {
    ("unlimited", "sync"): [[10, 10.0, 2.0], [20, 20.0, 1.5]],
    ("unlimited", "nesterov"): [[10, 8.0, 2.1], [20, 16.0, 1.6], [30, 24.0, 1.4]],
    ("80mbit+50ms", "sync"): [[10, 40.0, 2.0], [20, 80.0, 1.5]],
    ("80mbit+50ms", "nesterov"): [[10, 9.0, 2.1], [20, 18.0, 1.6], [30, 27.0, 1.4]],
}
TOKENS_PER_S = {"unlimited": 1000.0, "80mbit+50ms": 900.0}


def fake_run(cfg: RunConfig, link: str) -> dict:
    variant = "sync" if cfg.swarm.schedule == "sync" else cfg.swarm.async_correction
    evals = CURVES[(link, variant)]
    return {
        "heldout_loss": evals[-1][2],
        "tokens_per_s": TOKENS_PER_S[link] * (0.5 if variant == "sync" and link != "unlimited" else 1),
        "wall_s": evals[-1][1],
        "mean_inflight": 8.0,
        "evals": evals,
    }


def test_runs_unlimited_first_alternating_variants_and_resumes() -> None:
    seen: list[tuple[str, str, str]] = []

    def runner(cfg: RunConfig, link: str) -> dict:
        seen.append((link, cfg.swarm.schedule, cfg.swarm.async_correction))
        return fake_run(cfg, link)

    have = [{"link": "unlimited", "variant": "sync", **fake_run(RunConfig(), "unlimited")}]
    saves: list[int] = []
    runs = link_ttl.run_all(RunConfig(), link="80mbit+50ms", variants=["sync", "nesterov"], runs=have,
                            runner=runner, save=lambda rs: saves.append(len(rs)))  # fmt: skip
    # the run already measured is kept, not repeated; a save after every run
    assert seen == [("unlimited", "async", "nesterov"), ("80mbit+50ms", "sync", "nesterov"),
                    ("80mbit+50ms", "async", "nesterov")]  # fmt: skip
    assert [(r["link"], r["variant"]) for r in runs] == [(lk, v) for lk, v in CURVES]
    assert saves == [2, 3, 4]


def test_summary_targets_sync_unlimited_and_compares_with_the_same_swarm_unlimited() -> None:
    runs = [{"link": lk, "variant": v, **fake_run(link_ttl.variant_config(RunConfig(), v), lk)}
            for lk, v in CURVES]  # fmt: skip
    s = link_ttl.summarize(runs, "80mbit+50ms", None)
    assert s["target"] == 1.5  # sync's final held-out on the unlimited link
    rows = {(r["link"], r["variant"]): r for r in s["rows"]}
    reach = 1.5 * (1 + link_ttl.SLACK)  # 1.5015
    assert rows[("unlimited", "sync")]["seconds_to_target"] == pytest.approx(10 + 10 * (2.0 - reach) / 0.5)
    # nesterov: 1.6 at 16 s, 1.4 at 24 s unlimited; at 18 s and 27 s over the link
    free = 16 + 8 * (1.6 - reach) / 0.2
    assert rows[("unlimited", "nesterov")]["seconds_to_target"] == pytest.approx(free)
    link = rows[("80mbit+50ms", "nesterov")]
    assert link["seconds_to_target"] == pytest.approx(18 + 9 * (1.6 - reach) / 0.2)
    assert link["time_vs_unlimited"] == pytest.approx(9 / 8)
    assert link["throughput_vs_unlimited"] == pytest.approx(0.9)
    assert link["vs_sync"] == pytest.approx(1.4 / 1.5 - 1)
    assert rows[("80mbit+50ms", "sync")]["time_vs_unlimited"] == pytest.approx(4.0)  # 1.5 at 80 s, 20 s
    assert link_ttl.summarize(runs, "80mbit+50ms", 1.45)["rows"][0]["seconds_to_target"] is None  # never
    # sync over the link ends 1e-4 above sync unlimited (summation order): that reaches the target
    runs[2]["evals"] = [[10, 40.0, 2.0], [20, 80.0, 1.5001]]
    rows = link_ttl.summarize(runs, "80mbit+50ms", None)["rows"]
    assert rows[2]["seconds_to_target"] == pytest.approx(40 + 40 * (2.0 - reach) / (2.0 - 1.5001))


def test_bench_writes_json_markdown_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr(link_ttl, "measure", lambda cfg, link, **_: fake_run(cfg, link))
    r = link_ttl.bench(RunConfig(), out=tmp_path, link="80mbit+50ms", variants=["sync", "nesterov"], stages=4,
                       target=None, command="pmnode bench time-to-loss --config x", title="x",
                       console=Console(quiet=True))  # fmt: skip
    assert r["target"] == 1.5 and len(r["rows"]) == 4
    assert json.loads((tmp_path / "results.json").read_text())["command"].startswith("pmnode bench")
    md = (tmp_path / "results.md").read_text()
    assert "| 80mbit+50ms | nesterov | 1.4000 | -6.7% | 900 | 0.90 | 8 | 22 s | 1.13 |" in md
    assert (tmp_path / "time_to_loss.png").stat().st_size > 0


def test_bad_variant_or_link_is_one_clear_error() -> None:
    with pytest.raises(PmnodeError, match="variant 'fast'"):
        link_ttl.variant_config(RunConfig(), "fast")
    with pytest.raises(PmnodeError, match="positive integer"):
        link_ttl.variant_config(RunConfig(), "none@0")
    assert link_ttl.variant_config(RunConfig(), "none@48").swarm.max_inflight == 48
    with pytest.raises(PmnodeError, match="bad bandwidth"):
        link_ttl.parse_link("fast+50ms")
    with pytest.raises(PmnodeError, match="takes no latency"):
        link_ttl.parse_link("unlimited+50ms")
    assert link_ttl.parse_link("80mbit+50ms") == ("80mbit", "50ms")
