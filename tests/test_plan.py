"""`pmnode plan`: its figures against a hand computation for one small config, and its flag errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from launch import BIN, one_line_error

from pmnode.config import RunConfig
from pmnode.plan.costs import codec_bytes, stage_costs
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
    return subprocess.run([str(BIN / "pmnode"), "plan", *args], capture_output=True, text=True, timeout=180)


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
    procs = [
        subprocess.Popen(
            [str(BIN / "pmnode"), "plan", "--config", str(cfg_path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    for p, (_, needle) in zip(procs, cases, strict=True):
        out, err = p.communicate(timeout=180)
        one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), needle)
