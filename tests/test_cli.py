"""The real CLIs, invoked as a user would: outputs, exit codes, one-line errors.

Every case but test_console_scripts runs the command in this process (tests/cli_runner.py): the same
`main`, argv and streams, without 2-4 s of importing torch and hivemind per case; test_console_scripts
runs the installed scripts themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import coordinator, one_line, pmnode
from launch import TINY

BIN = Path(sys.executable).parent


def test_train_writes_summary(tmp_path: Path, toy_corpus: Path) -> None:
    # 2 steps: the fewest where one loss per step differs from one loss per run
    out = tmp_path / "s.json"
    r = pmnode(
        "train", "--config", TINY, "--steps", "2", "--data", str(toy_corpus), "--summary-json", str(out)
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())
    assert {"steps", "final_train_loss", "heldout_loss", "tokens_per_s", "codec"} <= set(s)
    assert s["steps"] == 2 and s["codec"] == "subspace:int8" and 0 < s["heldout_loss"] < 6  # tiny: the remedy
    assert len(s["train_losses"]) == 2


def test_bench_codec_json() -> None:
    r = pmnode("bench", "codec", "--config", TINY, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["d_model"] == 64 and rep["compression_rank"] == 8
    by = {c["name"]: c for c in rep["codecs"]}
    assert by["dense"]["bytes_per_token_forward"] == 256 and by["dense"]["ratio_vs_dense_fp32"] == 1.0
    assert by["subspace:int8"]["bytes_per_token_forward"] == 8 + 2 + 1
    assert by["subspace:int8"]["bytes_per_token_backward"] == 8 + 2
    # Measured, never asserted on (a dense copy can round to 0 against tiny's full-width step).
    assert all(c["encode_decode_fraction_of_step"] >= 0 for c in rep["codecs"])


def test_bench_codec_chosen_specs_and_ranks() -> None:
    r = pmnode(
        "bench",
        "codec",
        "--config",
        TINY,
        "--json",
        "--no-timing",
        "--codecs",
        "dense,subspace:int8@16",
    )
    assert r.returncode == 0, r.stderr
    rows = {c["name"]: c for c in json.loads(r.stdout)["codecs"]}
    assert rows["dense"]["bytes_per_token_forward"] == 256
    assert (
        rows["subspace:int8@16"]["rank"] == 16 and rows["subspace:int8@16"]["bytes_per_token_forward"] == 19
    )


def test_coordinator_inspect_json() -> None:
    r = coordinator("inspect", "--config", TINY, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["stages"] == [{"stage": s, "layers": [s, s + 1]} for s in range(4)]
    # tiny ships the remedy: every layer writes at full width (the paper's preset: only the tail, [3])
    assert len(info["fingerprint"]) == 16 and info["uncompressed_layers"] == [0, 1, 2, 3]


def test_missing_config() -> None:
    one_line(pmnode("train", "--config", "nope.yaml"), "config file not found: nope.yaml")


def test_bad_fields_one_per_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_model: -3\ntrain:\n  stepz: 4\n")
    r = pmnode("train", "--config", str(p))
    one_line(
        r, "model.d_model: Input should be greater than or equal to 8", "train.stepz: Extra inputs", fields=2
    )


def test_bad_churn_flags() -> None:
    one_line(pmnode("local-swarm", "--churn", "30"), "--churn takes MIN-MAX seconds")
    one_line(pmnode("local-swarm", "--churn", "60-30", "--replicas", "2"), "0 < MIN <= MAX")
    one_line(pmnode("local-swarm", "--churn", "30-60"), "--churn needs --replicas 2 or more")


def test_unknown_codec() -> None:
    one_line(pmnode("train", "--config", TINY, "--codec", "gzip"), "unknown codec 'gzip'")


def test_missing_data_path() -> None:
    one_line(pmnode("train", "--config", TINY, "--data", "/nonexistent/corpus"), "/nonexistent/corpus")


def test_cuda_absent() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line(pmnode("train", "--config", TINY, "--device", "cuda"), "no CUDA device")


def test_verbose_shows_traceback() -> None:
    r = pmnode("train", "--config", "nope.yaml", "--verbose")
    assert r.returncode == 1 and "Traceback" in r.stderr and "config file not found: nope.yaml" in r.stderr


def test_wrong_flag_is_usage_error() -> None:
    r = pmnode("train", "--confg", TINY)
    assert r.returncode == 2 and "No such option" in r.stderr


def test_help() -> None:
    for r in (pmnode("--help"), pmnode("bench", "--help"), coordinator("--help")):
        assert r.returncode == 0 and "Usage" in r.stdout


def test_console_scripts() -> None:
    """The installed `pmnode` script itself (pmnode.cli.entry), in fresh processes started together:
    its help, and a mistake that is one line on stderr with nothing printed at import time."""
    runs = [["--help"], ["train", "--config", "nope.yaml"]]
    procs = [
        subprocess.Popen([str(BIN / "pmnode"), *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for a in runs
    ]
    (help_out, help_err), (out, err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0 and "Usage" in help_out and "train" in help_out, help_err
    one_line(
        subprocess.CompletedProcess(procs[1].args, procs[1].returncode, out, err), "config file not found"
    )


def test_bad_override_flags_name_the_field() -> None:
    one_line(pmnode("train", "--config", "configs/tiny.yaml", "--steps", "0"), "train.steps", fields=1)
    r = pmnode("train", "--config", "configs/tiny.yaml", "--codec", "subspace@0")
    one_line(r, "subspace.compression_rank", fields=1)


def test_local_swarm_needs_two_stages() -> None:
    r = pmnode("local-swarm", "--stages", "1")
    assert r.returncode == 2 and "--stages" in r.stderr and "Traceback" not in r.stderr
