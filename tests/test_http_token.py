"""The coordinator's HTTP door: a 0600 token file or one clear line; without a token, 127.0.0.1 only.

The token-protected page of a training swarm (401 / 200, Prometheus' header, the browser) is tested
in test_status.py on a live swarm.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from launch import BIN, TINY, one_line_error

from coordinator.http import bearer_ok


def test_bearer_header_matches_the_token_only() -> None:
    assert bearer_ok("Bearer s3cret", "s3cret") and bearer_ok("bearer  s3cret ", "s3cret")
    for header in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cretx", "Basic s3cret", "s3cret"):
        assert not bearer_ok(header, "s3cret"), header


def _serve(tmp: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "coordinator"), "serve", "--config", TINY, "--state-dir", str(tmp / "state"), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_token_file_others_can_read_is_one_clear_line(tmp_path: Path) -> None:
    token = tmp_path / "http_token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    one_line_error(_serve(tmp_path, "--http-port", "0", "--http-token-file", str(token)), "chmod 600")
    token.chmod(0o600)
    one_line_error(_serve(tmp_path, "--http-token-file", str(token)), "--http-port")
    one_line_error(_serve(tmp_path, "--http-port", "0", "--http-token-file", str(tmp_path / "nope")), "nope")


def test_without_a_token_the_page_listens_on_127_0_0_1_and_says_how_to_open_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = [str(BIN / "coordinator"), "serve", "--config", TINY, "--state-dir", str(state)]
    args += ["--host", "0.0.0.0", "--http-port", "0"]  # a public coordinator: the page stays local
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = state / "coordinator.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        url = json.loads(info.read_text())["http"]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "status", timeout=10) as r:  # no token asked on this machine
            assert json.loads(r.read())["run"] == "tiny"
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    said = " ".join((out + err).split())
    assert "this machine only" in said and "--http-token-file" in said and "ssh -L" in said
