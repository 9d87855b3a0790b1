"""Each mistake a volunteer or operator can make gets one line that says what to do, and exit code 1.

The cases that need a coordinator run against a real `coordinator serve` on 127.0.0.1; so do those that
reach for the network. The mistakes caught before a node starts anything run `pmnode join` in this
process (tests/cli_runner.py), without a torch and hivemind import per case.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import one_line, pmnode
from launch import BIN, TINY, one_line_error
from launch import start_coordinator as start
from launch import stop_coordinator as stop

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli_errors")]  # one coordinator for all


def join(*args: str, token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PMNODE_JOIN_TOKEN"}
    if token is not None:
        env["PMNODE_JOIN_TOKEN"] = token
    return subprocess.run(
        [str(BIN / "pmnode"), "join", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("coord")
    proc, maddr = start(state)
    try:
        yield {"maddr": maddr, "token": (state / "join_token").read_text().strip(), "state": state}
    finally:
        stop(proc)


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_missing_token(coordinator: dict) -> None:
    r = join("--coordinator", coordinator["maddr"])
    one_line_error(r, "needs the run's join token", "PMNODE_JOIN_TOKEN", "--token-file")


def test_wrong_token(coordinator: dict) -> None:
    r = join("--coordinator", coordinator["maddr"], token="not-the-token")
    one_line_error(r, "refused to admit this node: the join token is wrong")
    assert "not-the-token" not in r.stdout + r.stderr  # a secret is never echoed


def test_token_file_must_be_private(coordinator: dict, tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(coordinator["token"])
    f.chmod(0o644)
    one_line_error(join("--coordinator", coordinator["maddr"], "--token-file", str(f)), "chmod 600")


def test_token_is_never_a_command_line_value() -> None:
    r = pmnode("join", "--device", "cpu", "--coordinator", "/ip4/127.0.0.1/tcp/1/p2p/Qm", "--token", "secret")
    assert r.returncode == 2 and "No such option" in r.stderr


def test_stage_out_of_range(coordinator: dict) -> None:
    r = join("--coordinator", coordinator["maddr"], "--stage", "9", token=coordinator["token"])
    one_line_error(r, "stage 9 is out of range: this run has stages 0..3")


def test_a_stage_too_large_for_this_machine_is_refused(coordinator: dict) -> None:
    r = join("--coordinator", coordinator["maddr"], "--memory-limit", "100KB", token=coordinator["token"])
    # tiny as shipped (the remedy) writes at full width inside a stage: 2.6 MiB (2.2 under the paper's)
    one_line_error(r, "stage 0 needs about 2.6 MiB", "--memory-limit is 97.7 KiB", "smaller stages")


def test_unreachable_coordinator() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = "QmRfuNFwGZRqCjj49WbtUrmgCoNdMmDytXAv43j3XWpTXQ"
    r = join("--coordinator", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", token="t", timeout=60)
    one_line_error(r, "could not reach the coordinator", "is running and reachable")


def test_coordinator_address_without_peer_id() -> None:
    r = pmnode(
        "join", "--device", "cpu", "--coordinator", "/ip4/127.0.0.1/tcp/1", env={"PMNODE_JOIN_TOKEN": "t"}
    )
    one_line(r, "must end in /p2p/<peer id>")


def test_node_port_in_use(coordinator: dict, busy_port: int) -> None:
    r = join("--coordinator", coordinator["maddr"], "--port", str(busy_port), token=coordinator["token"])
    one_line_error(r, f"127.0.0.1:{busy_port}", "in use", "--port")


def test_coordinator_port_in_use(busy_port: int, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            str(BIN / "coordinator"),
            "serve",
            "-c",
            TINY,
            "--port",
            str(busy_port),
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_error(r, "cannot start the coordinator", "in use")


def test_missing_data_path_before_joining(coordinator: dict) -> None:
    r = join(
        "--coordinator", coordinator["maddr"], "--data", "/nonexistent/corpus", token=coordinator["token"]
    )
    one_line_error(r, "data path not found: /nonexistent/corpus")


def test_cuda_absent_for_join() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = pmnode("join", "--coordinator", "/ip4/127.0.0.1/tcp/1/p2p/Qm", "--device", "cuda")
    one_line(r, "no CUDA device")


def test_fingerprint_mismatch_on_resume(coordinator: dict, tmp_path: Path) -> None:
    """A checkpoint from another basis is refused before the node serves anything."""
    ckpt = tmp_path / "ckpt"
    stage = ckpt / "stage-3"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text(
        '{"run": "tiny", "stage": 3, "layers": [3, 4], "step": 5, "fingerprint": "0000000000000000", '
        '"codec": "subspace"}'
    )
    r = join(
        "--coordinator",
        coordinator["maddr"],
        "--stage",
        "3",
        "--checkpoint-dir",
        str(ckpt),
        "--resume",
        token=coordinator["token"],
    )
    one_line_error(r, "fingerprint 0000000000000000 does not match")
