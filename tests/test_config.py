"""Config loading, validation messages and the pure layer split."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmnode.config import RunConfig, load_config
from pmnode.core.stages import free_layers, split_layers
from pmnode.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.rank <= cfg.model.d_model


def test_required_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "small", "llama-1b", "llama-8b"} <= names
    big = load_config(Path(__file__).parent.parent / "configs" / "llama-8b.yaml")
    m = big.model  # the paper's and node0's Llama-3-8B shape, k ~ d/100
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.hidden) == (4096, 32, 32, 8, 14336)
    assert (m.max_seq_len, m.vocab_size, big.rank, big.n_stages) == (4096, 128256, 160, 8)
    # The remedy at the bytes of the paper's fp32 k = 40: int8 at 4x the rank, pair and triple
    # tables without the 128K x d token table; the paper's constraint is one setting away.
    assert (big.codec_spec, big.subspace.constrain, big.subspace.stage_embeddings) == (
        "subspace:int8",
        "boundaries",
        False,
    )
    paper = big.with_overrides(subspace={"preset": "paper", "compression_rank": 40})
    sub = paper.subspace
    assert (paper.codec_spec, paper.rank, sub.constrain, sub.stage_embeddings, sub.stage_bigrams) == (
        "subspace",
        40,
        "layers",
        False,
        0,
    )


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "explicit", "expect"),
    [
        (4, 1, None, [(0, 4)]),
        (4, 2, None, [(0, 2), (2, 4)]),
        (5, 2, None, [(0, 3), (3, 5)]),
        (7, 3, None, [(0, 3), (3, 5), (5, 7)]),
        (6, 3, [1, 2, 3], [(0, 1), (1, 3), (3, 6)]),
    ],
)
def test_split_layers(n_layers: int, n_stages: int, explicit, expect) -> None:
    assert [(r.start, r.stop) for r in split_layers(n_layers, n_stages, explicit)] == expect


@pytest.mark.parametrize(
    ("n_layers", "n_stages", "explicit", "match"),
    [
        (2, 3, None, "leave a stage empty"),
        (4, 2, [4, 0], "leave a stage empty"),
        (4, 2, [1, 2], "sums to 3"),
        (4, 2, [1, 1, 2], "has 3 entries"),
        (4, 0, None, ">= 1"),
    ],
)
def test_split_layers_rejects(n_layers: int, n_stages: int, explicit, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_layers(n_layers, n_stages, explicit)


def test_free_tail_layers_must_fit_in_tail() -> None:
    paper = {"preset": "paper", "uncompressed_tail_layers": 2}  # only the paper's constrains layers
    ok = RunConfig.model_validate({"model": {"n_layers": 4}, "n_stages": 2, "subspace": paper})
    assert list(free_layers(ok)) == [2, 3]
    with pytest.raises(ValueError, match="tail stage holds 1 layer"):
        RunConfig.model_validate({"model": {"n_layers": 4}, "n_stages": 4, "subspace": paper})


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_model: 64\n  n_layer: 4\ntrian:\n  steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.n_layer: Extra inputs are not permitted" in msg
    assert "trian: Extra inputs are not permitted" in msg


def test_field_errors_one_per_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  d_model: 60\n  n_heads: 7\ntrain:\n  steps: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("invalid config")
    assert any(line.strip().startswith("train.steps:") for line in lines)
    assert any("not divisible by n_heads=7" in line for line in lines)


def test_rank_from_ratio_and_conflicts() -> None:
    cfg = RunConfig.model_validate({"model": {"d_model": 256}, "subspace": {"compression_ratio": 16}})
    assert cfg.rank == 16
    with pytest.raises(ValueError, match="not both"):
        RunConfig.model_validate({"subspace": {"compression_ratio": 16, "compression_rank": 4}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").name == "tiny"
    assert load_config("configs/small.yaml").model.d_model == 256  # the README's path, outside the repo
    with pytest.raises(ConfigError, match=r"shipped configs: bpe-small, deep, .*small, tiny"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="not found: elsewhere/tiny"):
        load_config("elsewhere/tiny")


@pytest.mark.parametrize(
    ("section", "key", "flag"), [("train", "autocast_bf16", "--bf16"), ("swarm", "threads", "--threads")]
)
def test_per_machine_knobs_are_not_run_config(tmp_path: Path, section: str, key: str, flag: str) -> None:
    """What one machine chooses is a flag of that machine's command, never part of what a swarm agrees on."""
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=flag):
        load_config(path)


def test_shipped_configs_resolve_by_name_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").name == load_config("configs/tiny.yaml").name
