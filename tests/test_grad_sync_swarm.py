"""replica_sync.method grads in a real swarm: 2 heads x 2 replicas per stage, real processes on
127.0.0.1, every replica's gradient sums sent top-k compressed with error feedback every step.

Every node applies every sample exactly once; the replicas of a stage end with the same weights (they
add the same decoded shares in the same order); each share is the size the format says; and the run
learns.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from launch import STEPS, assert_no_leftovers, run_heads_swarm, swarm_config

from pmnode.net.bulk import ALIGN

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heads"), pytest.mark.timeout(900)]

HEADS, REPLICAS, BATCH = 2, 2, 8
SYNC = {"method": "grads", "compressor": "topk", "error_feedback": 1.0}


@pytest.fixture(scope="module")
def grads_run(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> dict:
    tmp = tmp_path_factory.mktemp("grads")
    cfg = swarm_config(tmp, toy_corpus, train={"batch_size": BATCH}, replica_sync=SYNC)
    tag = uuid.uuid4().hex
    swarm = run_heads_swarm(tmp, cfg, HEADS, REPLICAS, tag)
    assert swarm.returncode == 0, swarm.stderr[-3000:]
    work = tmp / "work"
    return {
        "swarm": json.loads((tmp / "swarm.json").read_text()),
        "nodes": {p.stem: json.loads(p.read_text()) for p in work.glob("node-*.json")},
        "tag": tag,
    }


def test_every_sample_applied_once_and_replicas_end_equal(grads_run: dict) -> None:
    nodes = grads_run["nodes"]
    assert len(nodes) == 3 * REPLICAS
    for name, n in nodes.items():
        assert (n["steps"], n["samples_applied"], n["samples_off"]) == (STEPS, STEPS * HEADS * BATCH, 0), name
        assert n["grad_shares"]["refused"] == {}, name
    for stage in range(3):
        digests = {n["grad_shares"]["weights"] for n in nodes.values() if n["stage"] == stage}
        assert len(digests) == 1 and "" not in digests, f"stage {stage}: {digests}"
    assert_no_leftovers(grads_run["tag"])


def test_shares_are_the_compressed_size_every_step(grads_run: dict) -> None:
    for name, n in grads_run["nodes"].items():
        g = n["grad_shares"]
        assert 0 < g["of_exact"] < 1, name  # top-k: fewer bytes than the fp32 sums
        padded = g["bytes_per_step"] + (-g["bytes_per_step"]) % ALIGN  # bulk aligns each tensor
        # one peer per stage: every step prepared with it fetched exactly one share of it
        assert g["steps"] >= STEPS - 2 and g["bytes_received"] == g["steps"] * padded, name


def test_it_learns(grads_run: dict) -> None:
    """Top-k at 1% starts slowly: over these 30 steps the held-out loss falls from 5.57 to about 4.2
    where exact sums reach about 2.5 to 3.1 (the gap closes to +2% by 400k tokens on tiny, see
    docs/benchmarks/scale). With `compressor: none` the same swarm equals `pmnode train` to 2e-5."""
    swarm = grads_run["swarm"]
    assert swarm["heldout_loss"] < 0.85 * swarm["train_losses"][0]
