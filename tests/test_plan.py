"""`pmnode plan`: its figures against a hand computation for one small config, heads and replica-sync
traffic against hand cases (closed form and simulator), and its flag errors. The command runs in this
process (tests/cli_runner.py): the same exit codes and output, without a torch import per case."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_runner import one_line, pmnode

from pmnode.config import RunConfig, load_config
from pmnode.core.compress import round_bytes
from pmnode.core.sizing import stage_sizes
from pmnode.core.stages import Stage
from pmnode.core.train import config_for
from pmnode.plan.closed import PlanInputs, closed_form
from pmnode.plan.costs import StageCost, codec_bytes, stage_costs
from pmnode.plan.plan import simulate
from pmnode.plan.shapes import stage_shapes
from pmnode.plan.sync import SyncLoad
from pmnode.swarm.report import ComputeTimes, NodeSummary

# d = 64, 4 layers over 2 stages, ffn 128, 4 heads of 16 (kv too), vocab 256, micro-batch 2 x 32 tokens.
CFG = {
    "name": "hand",
    "model": {
        "vocab_size": 256,
        "d_model": 64,
        "n_layers": 4,
        "n_heads": 4,
        "ffn_hidden": 128,
        "max_seq_len": 32,
    },
    "n_stages": 2,
    "subspace": {"compression_rank": 8, "uncompressed_tail_layers": 1},
    "train": {"batch_size": 4, "micro_batch_size": 2, "seq_len": 32},
    "swarm": {"schedule": "async", "max_inflight": 4},
}
# By hand: a layer has 2·64² (q, o) + 2·64·64 (k, v) + 3·64·128 (SwiGLU) + 2·64 (norms) = 41,088 weights.
LAYER = 2 * 64 * 64 + 2 * 64 * 64 + 3 * 64 * 128 + 2 * 64
MATMUL = LAYER - 2 * 64  # the norms' gains scale elementwise: no multiply-adds counted
ATTN = 2 * 32 * 64  # QKᵀ and AV per token, causal
HEAD_FWD, HEAD_BWD = 2 * (2 * MATMUL) + 2 * ATTN, 4 * (2 * MATMUL) + 4 * ATTN  # 172,032 and 344,064
TAIL_FWD, TAIL_BWD = HEAD_FWD + 2 * 64 * 256, HEAD_BWD + 4 * 64 * 256  # the LM head, 64 x 256


@pytest.fixture()
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "hand.yaml"
    p.write_text(yaml.safe_dump(CFG))
    return p


def test_stage_costs_by_hand() -> None:
    cfg = RunConfig.model_validate(CFG)
    head, tail = stage_costs(cfg, "dense")
    assert (head.params, tail.params) == (2 * LAYER + 256 * 64, 2 * LAYER + 256 * 64 + 64)
    assert (head.flops_fwd_per_token, head.flops_bwd_per_token) == (HEAD_FWD, HEAD_BWD) == (172_032, 344_064)
    assert (tail.flops_fwd_per_token, tail.flops_bwd_per_token) == (TAIL_FWD, TAIL_BWD)
    assert (head.bytes_fwd_per_token, head.bytes_bwd_per_token, tail.bytes_bwd_per_token) == (256, 0, 256)
    assert codec_bytes(cfg, "subspace") == (8 * 4 + 1, 8 * 4, 8)  # fp32 coefficients + a uint8 token
    assert codec_bytes(cfg, "subspace:int8@16") == (16 + 2 + 1, 18, 16)
    assert codec_bytes(cfg, "dense:bf16")[:2] == (128, 128)


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return pmnode("plan", *args)


def test_closed_form_by_hand(cfg_path: Path) -> None:
    # 1e9 FLOP/s per node: the head does 1e9 / 517,632 tokens/s, the tail 1e9 / 615,936 = 1,623.5.
    r = plan("--config", str(cfg_path), "--tflops", "0.001", "--mfu", "1", "--codec", "dense", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    c = p["closed"]
    assert c["stages"][0]["compute_tokens_per_s"] == pytest.approx(1e9 / (HEAD_FWD + HEAD_BWD))
    assert c["stages"][1]["compute_tokens_per_s"] == pytest.approx(1e9 / (TAIL_FWD + TAIL_BWD))
    assert c["stages"][0]["link_fwd_tokens_per_s"] == pytest.approx(1e7 / 256)  # 80 Mbit/s = 1e7 B/s
    # Round trip of 64 tokens: compute 64·1,133,568 / 1e9 s, plus 2 x 50 ms and 64·512 B at 1e7 B/s.
    rtt = 64 * (HEAD_FWD + HEAD_BWD + TAIL_FWD + TAIL_BWD) / 1e9 + 0.1 + 64 * 512 / 1e7
    assert c["round_trip_s"] == pytest.approx(rtt)
    # Four micro-batches in flight carry 256 tokens per round trip: 1,456 tokens/s, below compute.
    assert c["tokens_per_s"] == pytest.approx(4 * 64 / rtt)
    assert c["binding"] == "latency and the in-flight window"
    assert c["suggested_max_inflight"] == 5  # ceil(rtt x 1,623.5 / 64)
    assert p["simulated"]["tokens_per_s"] == pytest.approx(c["tokens_per_s"], rel=0.03)
    assert p["max_k_compute_bound"] == 64  # 80 Mbit/s carries even k = d


def test_link_bound_and_largest_k(cfg_path: Path) -> None:
    r = plan("--config", str(cfg_path), "--tflops", "0.001", "--mfu", "1", "--codec", "dense", "--bandwidth",
             "1mbit", "--latency", "0", "--max-inflight", "16", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["closed"]["tokens_per_s"] == pytest.approx(125_000 / 256)
    assert p["closed"]["binding"] == "link 0->1"
    assert p["simulated"]["tokens_per_s"] == pytest.approx(125_000 / 256, rel=0.03)
    # k keeps up while 125,000 / (4k + 1) >= 1,623.5 tokens/s: 4k + 1 <= 76.99, k = 18.
    assert p["max_k_compute_bound"] == 18
    # The advice is one the link carries at the compute rate, with the lowest cost the study measured.
    a = p["advice"]
    assert a is not None and a["bytes_per_token"] * 1623.5 <= 125_000
    assert a["measured"] is None or a["measured"]["gap"] is not None


def test_measured_times(cfg_path: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for stage, (f, b) in enumerate([(0.064, 0.128), (0.0, 0.256)]):  # per micro-batch of 64 tokens
        s = NodeSummary.model_validate(
            {"stage": stage, "steps": 1, "schedule": "async", "codec": "dense", "samples_applied": 4,
             "client": {}, "server": {}, "rejected": {}, "bans": 0, "dropped_gradients": 0, "reissued": 0,
             "samples_off": 0, "steps_lost": 0, "paused_s": 0.0, "averaging": {},
             "compute": ComputeTimes(forward_s=10 * f, forwards=10 * (f > 0), backward_s=10 * b, backwards=10)
            }
        )  # fmt: skip
        (runs / f"node-{stage}.json").write_text(s.model_dump_json())
    r = plan("--config", str(cfg_path), "--measured", str(runs), "--bandwidth", "unlimited", "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["closed"]
    assert [s["compute_tokens_per_s"] for s in c["stages"]] == pytest.approx([64 / 0.192, 64 / 0.256])


def test_bad_flags_get_one_line(cfg_path: Path, tmp_path: Path) -> None:
    cases = [
        (["--gpu", "rtx9999"], "unknown --gpu"),
        (["--gpu", "rtx4090", "--tflops", "100"], "exactly one of"),
        (["--gpu", "rtx4090", "--bandwidth", "80"], "bad bandwidth"),
        (["--gpu", "rtx4090", "--mfu", "2"], "--mfu"),
        (["--gpu", "rtx4090", "--codec", "zip"], "unknown codec"),
        (["--measured", str(tmp_path / "none.json")], "--measured"),
    ]
    for args, needle in cases:
        one_line(plan("--config", str(cfg_path), *args), needle)


# ---- heads and replica sync ---------------------------------------------------------------------
def _cost(stage: int, fwd_bytes: int, bwd_bytes: int) -> StageCost:
    return StageCost(
        stage=stage, layers=1, params=0, flops_fwd_per_token=0, flops_bwd_per_token=0,
        bytes_fwd_per_token=fwd_bytes, bytes_bwd_per_token=bwd_bytes, memory_bytes=0,
    )  # fmt: skip


def _inputs(head_s: float, tail_s: float, **kw: object) -> PlanInputs:
    """Two stages, 100-token micro-batches, one per head a step, 10 B/token each way, no latency."""
    base: dict = {
        "costs": [_cost(0, 10, 0), _cost(1, 0, 10)],
        "fwd_s_per_token": [head_s / 2, 0.0],
        "bwd_s_per_token": [head_s / 2, tail_s],
        "bandwidth": 1e6,
        "latency": 0.0,
        "max_inflight": 8,
        "tokens_per_micro_batch": 100,
        "micro_batches_per_step": 1,
    }
    return PlanInputs(**{**base, **kw})


def test_stage_shapes_are_the_built_stages() -> None:
    for cfg in (RunConfig.model_validate(CFG), load_config("tiny"), load_config("small")):
        shapes = stage_shapes(cfg)
        for i, size in enumerate(stage_sizes(cfg)):
            built = sorted(tuple(p.shape) for p in Stage(cfg, i).parameters() if p.requires_grad)
            assert sorted(shapes[i]) == built
            assert sum(math.prod(s) for s in shapes[i]) == size.params_trainable


def test_heads_multiply_throughput_where_the_head_binds() -> None:
    # The head's 200 µs per token binds (5,000 tokens/s); the tail does 50,000. Two heads: 10,000.
    for heads in (1, 2):
        p = _inputs(2e-4, 2e-5, heads=heads)
        c = closed_form(p)
        assert c.tokens_per_s == pytest.approx(5000 * heads)
        assert c.binding == "compute, stage 0"
        assert simulate(p).tokens_per_s == pytest.approx(5000 * heads, rel=0.03)


def test_sync_that_does_not_fit_the_link_binds() -> None:
    # Two tail replicas (10,000 tokens/s of compute) send 1 MB every 10 steps of 100 tokens on a
    # 1 MB/s link that also carries 5 B/token of activations each way: 1e6 / (5 + 1000) tokens/s.
    load = SyncLoad(share_bytes=10**6, up_bytes=10**6, down_bytes=10**6, every_steps=10, every_s=None,
                    blocking=False)  # fmt: skip
    p = _inputs(2e-5, 2e-4, replicas=2, sync=[None, load])
    c = closed_form(p)
    assert c.tokens_per_s == pytest.approx(1e6 / 1005)
    assert c.binding == "replica sync, stage 1"
    assert c.tokens_per_s_without_sync == pytest.approx(10_000)
    (s,) = c.replica_sync
    assert s.binds and s.hidden < 0.2 and s.bytes_per_round == 10**6
    sim = simulate(p)
    assert sim.tokens_per_s == pytest.approx(c.tokens_per_s, rel=0.05)
    assert sim.binding == "replica sync, stage 1"
    # The same bytes every 1,000 steps hide: the swarm is back at its compute rate, in both.
    hidden = p.model_copy(update={"sync": [None, load.model_copy(update={"every_steps": 1000})]})
    assert closed_form(hidden).tokens_per_s == pytest.approx(10_000)
    assert closed_form(hidden).replica_sync[0].hidden == 1.0
    assert simulate(hidden).tokens_per_s == pytest.approx(10_000, rel=0.05)


def test_sync_step_waits_in_the_commit() -> None:
    # sync schedule: the two tail replicas exchange 2 MB in every commit at 1 MB/s: 2 s a step.
    load = SyncLoad(share_bytes=2 * 10**6, up_bytes=2 * 10**6, down_bytes=2 * 10**6, every_steps=1,
                    every_s=None, blocking=True, in_commit=True)  # fmt: skip
    p = _inputs(2e-5, 2e-4, replicas=2, schedule="sync", sync=[None, load])
    c = closed_form(p)
    drain = 100 * (2e-5 + 2e-4) + 100 * 20 / 1e6  # one micro-batch's round trip
    assert c.step_s == pytest.approx(drain + 2.0)
    assert c.binding.startswith("replica sync, stage 1")
    assert simulate(p).step_s == pytest.approx(c.step_s, rel=0.03)


def test_json_carries_each_stages_round_bytes(cfg_path: Path) -> None:
    r = plan("--config", str(cfg_path), "--tflops", "0.001", "--mfu", "1", "--heads", "2", "--replicas", "3",
             "--replica-sync", "outer", "--compressor", "topk", "--inner-steps", "5", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    cfg = RunConfig.model_validate(CFG).with_overrides(
        replica_sync={"method": "outer", "compressor": "topk", "inner_steps": 5}
    )
    shapes = stage_shapes(config_for(cfg, cfg.codec_spec)[0])
    rows = p["closed"]["replica_sync"]
    assert [x["nodes"] for x in rows] == [2, 3]
    assert [x["bytes_per_round"] for x in rows] == [round_bytes(s, cfg.replica_sync) for s in shapes]
    assert [x["upload_bytes_per_round"] for x in rows] == [
        1 * rows[0]["bytes_per_round"],
        2 * rows[1]["bytes_per_round"],
    ]
    assert p["tokens_per_step"] == 2 * 4 * 32  # every head drives its own batch
    assert p["sync_advice"]["method"] == "outer"


def test_grads_are_compressed_shares_in_every_commit() -> None:
    from pmnode.plan.sync import SyncSettings, sync_load

    cfg = RunConfig.model_validate(CFG).with_overrides(replica_sync={"method": "grads", "compressor": "topk"})
    shapes = stage_shapes(config_for(cfg, cfg.codec_spec)[0])[1]
    settings = SyncSettings(replica_sync=cfg.replica_sync, schedule="sync", average_period=5.0)
    load = sync_load(shapes, 3, settings)
    assert load is not None
    share = round_bytes(shapes, cfg.replica_sync)
    assert (load.share_bytes, load.up_bytes, load.down_bytes) == (share, 2 * share, 2 * share)
    assert (load.every_steps, load.blocking, load.in_commit) == (1, True, True)
    assert settings.describe().startswith("grads: top-k 0.01 at 2 bits every step")


def test_bad_sync_flags_get_one_line(cfg_path: Path) -> None:
    cases = [
        (["--heads", "0"], "--heads"),
        (["--replica-sync", "gossip"], "--replica-sync"),
        (["--compressor", "zip"], "--compressor"),
        (["--inner-steps", "0"], "--inner-steps"),
        (["--sync-topology", "ring"], "--sync-topology"),
        (["--replica-sync", "grads", "--schedule", "async"], "grads runs in sync swarms only"),
    ]
    for args, needle in cases:
        one_line(plan("--config", str(cfg_path), "--tflops", "1", *args), needle)
