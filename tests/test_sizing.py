"""Per-stage sizing: counts by hand for Llama-8B, counts of built stages for small configs, and
`coordinator inspect --json`'s memory figures following from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from pmnode.config import load_config
from pmnode.core.sizing import PRECISIONS, parse_size, stage_sizes
from pmnode.core.stages import Stage
from pmnode.errors import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def llama8b_by_hand(preset: str) -> tuple[list[int], int]:
    """Trainable parameters per stage and frozen ones (U and F) of llama-8b: the shipped remedy
    (int8 k = 160, full width inside a stage, pair and triple tables of 16,384 rows, no token
    table) or the paper's constraint at k = 40 (wo and w2 reparametrised, k x n)."""
    d, kv, h, v = 4096, 1024, 14336, 128256
    k = 160 if preset == "remedy" else 40
    common = 2 * d + d * d + 2 * d * kv + 2 * d * h  # norms, wq, wk, wv, w1, w3
    free = common + d * d + d * h  # a layer writing at full width
    assert free == 218_112_000  # the "218M parameters" of one unconstrained layer
    if preset == "remedy":
        tables = 2 * 16_384 * d  # pairs and triples, full width in boundaries mode
        head, body = 4 * free + v * d, 4 * free + tables
        tail = 4 * free + tables + d + v * d  # final norm and LM head
    else:
        constrained = common + k * d + k * h  # wo and w2 reparametrised: k x n
        head = 4 * constrained + v * k  # the token embedding's E is k wide too
        body = 4 * constrained
        tail = 3 * constrained + free + d + v * d
    return [head, *[body] * 6, tail], d * k + v * d


def paper_llama8b(tmp_path: Path) -> Path:
    """llama-8b.yaml with the paper's constraint at k = 40 (d/100), as shipped before the remedy."""
    text = (CONFIGS / "llama-8b.yaml").read_text()
    text = text.replace("preset: remedy", "preset: paper").replace(
        "compression_rank: 160", "compression_rank: 40"
    )
    text = text.replace("  stage_embeddings: false\n  stage_bigrams: 16384\n  stage_ngrams: 3\n", "")
    out = tmp_path / "llama-8b-paper.yaml"
    out.write_text(text)
    return out


@pytest.mark.parametrize("preset", ["remedy", "paper"])
def test_inspect_llama8b_matches_hand_count(preset: str, tmp_path: Path) -> None:
    path = CONFIGS / "llama-8b.yaml" if preset == "remedy" else paper_llama8b(tmp_path)
    result = CliRunner().invoke(app, ["inspect", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    sizes = info["sizes"]
    trainable, frozen = llama8b_by_hand(preset)
    assert [s["params_trainable"] for s in sizes] == trainable
    if preset == "paper":
        assert trainable[1] == 573_407_232 and frozen == 525_500_416
    wire = (
        160 + 2 + 4 if preset == "remedy" else 40 * 4 + 4
    )  # int8 k + its fp16 scale, or fp32 k; int32 token
    assert [s["layers"] for s in sizes] == [[4 * i, 4 * i + 4] for i in range(8)]
    for s in sizes:
        n = s["params_trainable"]
        assert s["params_frozen"] == frozen
        assert s["bytes_per_token_fwd"] == (0 if s["stage"] == 7 else wire)
        mem = {m["precision"]: m for m in s["memory"]}
        assert set(mem) == set(PRECISIONS)
        fp32, int8 = mem["fp32"], mem["int8-adam"]
        assert (fp32["weights"], fp32["grads"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)
        assert int8["optimizer"] == round(n * (2 + 8 / 256))  # int8 m and v, an fp32 scale per 256
        assert fp32["frozen"] == 4 * frozen
        for m in mem.values():
            cast = 2 * n if m["precision"].startswith("bf16") else 0  # autocast's bf16 weight copies
            parts = m["weights"] + m["grads"] + m["optimizer"] + m["frozen"] + m["activations"] + cast
            assert m["total"] == parts
            assert m["total"] - m["total_checkpointed"] == m["activations"] - m["activations_checkpointed"]
        assert mem["bf16"]["activations"] < fp32["activations"]


def test_inspect_gpu_memory_says_what_fits(tmp_path: Path) -> None:
    args = ["inspect", "--config", str(paper_llama8b(tmp_path)), "--json", "--gpu-memory", "16GB"]
    info = json.loads(CliRunner().invoke(app, args).output)
    body, tail = info["sizes"][1]["fits"], info["sizes"][7]["fits"]
    assert body["fp32"] == {"plain": False, "checkpointed": True}
    assert body["bf16+int8-adam"]["plain"] and not tail["bf16+int8-adam"]["checkpointed"]
    # The shipped remedy writes at full width inside a stage: 1.0G parameters a body stage, not 0.57G.
    args[2] = str(CONFIGS / "llama-8b.yaml")
    body = json.loads(CliRunner().invoke(app, args).output)["sizes"][1]["fits"]
    assert body["fp32"] == {"plain": False, "checkpointed": False} and body["int8-adam"]["checkpointed"]


@pytest.mark.parametrize(
    "subspace",
    [
        {},
        {"mode": "projection"},
        {"enabled": False},
        {"constrain": "boundaries"},
        {"stage_embeddings": True, "stage_bigrams": 64},
    ],
)
def test_counts_equal_built_stages(subspace: dict) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml").with_overrides(subspace=subspace)
    for size in stage_sizes(cfg):
        stage = Stage(cfg, size.stage)
        assert size.params_trainable == sum(p.numel() for p in stage.parameters() if p.requires_grad)
        frozen = sum(b.numel() for b in stage.subspace.buffers()) if stage.subspace is not None else 0
        assert size.params_frozen == frozen
        writes = sum(w.weight.numel() for w in stage.writes())
        assert size.params_writes == writes


def test_parse_size() -> None:
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("512 mb") == 512 * 10**6
    with pytest.raises(ConfigError, match="24GB"):
        parse_size("lots")
