"""Golden losses: a debug-size model trains a few steps; losses must match the committed file.

Catches silent numeric regressions in the model, subspace, codecs or optimizer.
Regenerate deliberately with PMNODE_UPDATE_GOLDEN=1 and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pmnode.config import load_config
from pmnode.core.train import train

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"
CONFIG = Path(__file__).parent.parent / "configs" / "tiny.yaml"
STEPS = 12


@pytest.mark.parametrize("codec", ["dense", "subspace", "subspace:int8"])
def test_golden_losses(codec: str, toy_corpus: Path) -> None:
    cfg = load_config(CONFIG).with_overrides(
        train={"steps": STEPS, "eval_every": STEPS},
        data={"source": str(toy_corpus), "max_bytes": None},
        subspace={"enabled": codec.startswith("subspace")},
    )
    losses = train(cfg, codec).train_losses
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("PMNODE_UPDATE_GOLDEN"):
        golden[codec] = [round(v, 6) for v in losses]
        GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
    assert codec in golden, "no golden losses yet: run with PMNODE_UPDATE_GOLDEN=1"
    assert losses == pytest.approx(golden[codec], rel=1e-3)
    assert losses[-1] < losses[0] - 0.5  # and it really learns
