"""`pmnode generate`: sampling from a checkpoint through every stage and boundary codec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pmnode.config import RunConfig, load_config
from pmnode.core import checkpoint
from pmnode.core.generate import CheckpointModel, generate, load_checkpoint, sample
from pmnode.core.stages import Stage
from pmnode.core.train import Pipeline
from pmnode.data.resolve import open_data
from pmnode.data.shards import DataPosition
from pmnode.errors import PmnodeError

pytestmark = pytest.mark.xdist_group("generate")  # its module fixture runs once

ROOT = Path(__file__).parent.parent
PMNODE = str(Path(sys.executable).parent / "pmnode")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> tuple[Path, RunConfig, Pipeline]:
    """A 4-stage tiny run, 30 small steps in-process (quality is beside the point), saved like a swarm."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml").with_overrides(
        train={"steps": 30, "batch_size": 4, "micro_batch_size": None}, data={"source": str(toy_corpus)}
    )
    t = cfg.train
    data, pos = open_data(cfg.data, t.seq_len, cfg.model.vocab_size), DataPosition()
    pipe = Pipeline(cfg, cfg.codec_spec)
    for _ in range(t.steps):
        x, y, pos = data.train.batch(pos, t.batch_size, t.seed)
        pipe.train_step(x, y)
    root = tmp_path_factory.mktemp("ckpt")
    for w in pipe.workers:
        checkpoint.save(w, root, cfg.name)
    checkpoint.save_run_config(cfg, root)
    return root, cfg, pipe


@pytest.fixture(scope="module")
def model(trained: tuple[Path, RunConfig, Pipeline]) -> CheckpointModel:
    return load_checkpoint(trained[0])


def test_run_config_round_trips(trained: tuple[Path, RunConfig, Pipeline]) -> None:
    root, cfg, _ = trained
    assert checkpoint.load_run_config(root) == cfg
    assert not list(root.glob("*.tmp"))


def test_prompt_plus_exactly_n_tokens_deterministic(model: CheckpointModel) -> None:
    prompt_ids = model.tokenizer.encode("def ")
    a = generate(model, "def ", 16, temperature=1.0, seed=7)
    assert a.n_prompt == len(prompt_ids) and a.ids[: a.n_prompt] == prompt_ids
    assert len(a.ids) == len(prompt_ids) + 16
    assert a.text.startswith("def ")
    assert generate(model, "def ", 16, temperature=1.0, seed=7).ids == a.ids
    assert generate(model, "def ", 16, temperature=1.0, seed=8).ids != a.ids
    greedy = generate(model, "def ", 16, temperature=0)
    assert generate(model, "def ", 16, temperature=0, seed=123).ids == greedy.ids
    assert generate(model, "def ", 16, temperature=1.0, top_k=1, seed=5).ids == greedy.ids
    # Past max_seq_len the context is cropped instead of overrunning the RoPE tables.
    long = generate(model, "x" * 60, 8, temperature=0)
    assert len(long.ids) == 68


def test_logits_match_the_trained_pipeline(
    model: CheckpointModel, trained: tuple[Path, RunConfig, Pipeline]
) -> None:
    pipe = trained[2]
    x = torch.tensor([model.tokenizer.encode("import os\ndef main():\n    return ")])
    y = torch.roll(x, -1, dims=1)
    logits = model.logits(x)
    # The loaded chain computes what the trained pipeline computes ...
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert loss == pytest.approx(pipe.eval_loss([(x, y)]), rel=1e-5)


def test_the_papers_chain_is_the_unsplit_model(
    trained: tuple[Path, RunConfig, Pipeline], tmp_path: Path
) -> None:
    """Under the paper's constraint the subspace codec is lossless: a checkpoint's chain computes what
    one unsplit model with the same weights computes (the shipped remedy projects where a stage ends
    and gives each stage its own tables: a different model, so this holds for the paper's only)."""
    cfg = trained[1].with_overrides(subspace={"preset": "paper"})
    for w in Pipeline(cfg, cfg.codec_spec).workers:  # the seeded initial weights
        checkpoint.save(w, tmp_path, cfg.name)
    checkpoint.save_run_config(cfg, tmp_path)
    model = load_checkpoint(tmp_path)
    x = torch.tensor([model.tokenizer.encode("import os\ndef main():\n    return ")])
    logits = model.logits(x)
    whole = Stage(cfg.with_overrides(n_stages=1, stage_layers=None), 0)
    state = {k: v for w in model.pipe.workers for k, v in w.stage.state_dict().items()}
    whole.load_state_dict(state)
    with torch.no_grad():
        ref = whole(None, x)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)

    def unsplit(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return whole(None, tokens)

    prompt = model.tokenizer.encode("def ")
    greedy = sample(unsplit, prompt, 20, max_seq_len=cfg.model.max_seq_len, temperature=0)
    assert generate(model, "def ", 20, temperature=0).ids == greedy


def test_incomplete_checkpoint_is_refused(trained: tuple[Path, RunConfig, Pipeline], tmp_path: Path) -> None:
    cfg = trained[1]
    with pytest.raises(PmnodeError, match=r"run\.json is missing"):
        load_checkpoint(tmp_path)
    checkpoint.save_run_config(cfg, tmp_path)
    with pytest.raises(PmnodeError, match=r"stage-0 has no manifest\.json"):
        load_checkpoint(tmp_path)


def test_cli(trained: tuple[Path, RunConfig, Pipeline], tmp_path: Path) -> None:
    root = trained[0]
    args = ["generate", "--checkpoint", str(root), "--prompt", "def ", "--max-new-tokens", "20"]
    r = subprocess.run([PMNODE, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and r.stdout.endswith("\n")
    assert "loaded run tiny" in r.stderr and "step 30" in r.stderr

    r = subprocess.run(
        [PMNODE, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "def "],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "is not a pmnode checkpoint" in r.stderr
    assert "pmnode local-swarm --checkpoint-dir" in r.stderr
