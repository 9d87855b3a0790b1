"""Swarm status while a real swarm trains: the RPC behind `pmnode status`, /status, /metrics, the page."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from launch import BIN, assert_no_leftovers, start_async_swarm, swarm_config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pmnode.net.status import HistoryPoint, SwarmStatus, thin

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("status")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_thin_keeps_history_bounded_and_the_newest_points() -> None:
    points = [HistoryPoint(step=i, loss=1.0, time=float(i)) for i in range(5000)]
    kept = thin(points, limit=2000)
    assert len(kept) < 5000 and kept[-1000:] == points[-1000:]
    assert [p.step for p in kept] == sorted(p.step for p in kept)
    assert thin(points[:10]) == points[:10]


def _get(url: str, token: str | None = None, scheme: str = "Bearer") -> tuple[str, bytes]:
    """GET as Prometheus' `authorization: {type: Bearer, credentials_file: ...}` scrapes it."""
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.headers["Content-Type"], r.read()


def _chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with the flags this closed network needs; a fresh profile every time."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,  # type: ignore[list-item]
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=8000",  # let the page's fetch and drawing finish
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )


@pytest.fixture(scope="module")
def live_swarm(tmp_path_factory: pytest.TempPathFactory, toy_corpus: Path) -> Iterator[dict]:
    """An async 3-stage swarm with its status page behind a token, trained until every stage reports;
    SIGTERM after."""
    tmp = tmp_path_factory.mktemp("status")
    cfg = swarm_config(tmp, toy_corpus, train={"steps": 100_000, "eval_every": 5})
    tag, token = uuid.uuid4().hex, uuid.uuid4().hex
    token_file = tmp / "http_token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    work = tmp / "work"
    err = work.with_suffix(".err")
    proc = start_async_swarm(cfg, work, tag, "--http-port", "0", "--http-token-file", str(token_file))
    try:
        info_path = work / "coordinator" / "coordinator.json"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()[-3000:]
            time.sleep(1)
            if not info_path.exists() or "http" not in json.loads(info_path.read_text()):
                continue
            base = json.loads(info_path.read_text())["http"]
            status = SwarmStatus.model_validate_json(_get(base + "status", token)[1])
            trained = [h for h in status.history if h.heldout_loss is not None]
            if all(s.replicas for s in status.stages) and len(status.history) >= 3 and trained:
                break
        else:
            raise AssertionError(f"the swarm did not report within 240 s: {err.read_text()[-3000:]}")
        yield {"base": base, "info": info_path, "tag": tag, "token": token, "token_file": token_file}
        proc.send_signal(signal.SIGTERM)  # `kill` must clean up as Ctrl-C does (tested in test_swarm)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_leftovers(tag)


def test_status_json(live_swarm: dict) -> None:
    ctype, body = _get(live_swarm["base"] + "status", live_swarm["token"])
    assert ctype == "application/json"
    status = SwarmStatus.model_validate_json(body)
    assert [s.stage for s in status.stages] == [0, 1, 2]
    assert [s.role for s in status.stages] == ["head", "body", "tail"]
    assert [s.layers for s in status.stages] == [(0, 2), (2, 3), (3, 4)]
    assert [len(s.replicas) for s in status.stages] == [1, 1, 1]
    assert all(r.state == "online" and r.last_seen_s < 10 for s in status.stages for r in s.replicas)
    assert all(s.throughput > 0 for s in status.stages)
    assert status.run == "tiny" and status.compression_rank == 8 and status.fingerprint
    assert status.global_step >= 3 and status.loss is not None and status.heldout_loss is not None
    assert status.tokens_per_s > 0 and status.wire_bytes_per_s > 0
    steps = [h.step for h in status.history]
    assert steps == sorted(set(steps))


def test_metrics_scraped_by_a_real_client(live_swarm: dict) -> None:
    ctype, body = _get(live_swarm["base"] + "metrics", live_swarm["token"])
    assert ctype.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert samples[("pmnode_global_step", ())] >= 3
    assert samples[("pmnode_target_steps", ())] == 100_000
    assert [samples[("pmnode_stage_replicas", (("stage", str(i)),))] for i in range(3)] == [1, 1, 1]
    assert samples[("pmnode_joins_total", ())] == 3
    assert samples[("pmnode_train_loss", ())] > 0
    assert len([k for k in samples if k[0] == "pmnode_node_step"]) == 3
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(live_swarm["base"] + "nope", live_swarm["token"])
    assert e.value.code == 404


def test_status_and_metrics_need_the_token(live_swarm: dict) -> None:
    base, token = live_swarm["base"], live_swarm["token"]
    refused = 0
    for path in ("status", "metrics"):
        bad = ((None, "Bearer"), ("wrong", "Bearer"), (token + "x", "Bearer"), (token, "Basic"))
        for given, scheme in bad:
            with pytest.raises(urllib.error.HTTPError) as e:
                _get(base + path, given, scheme)
            assert e.value.code == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")
            refused += 1
        assert _get(base + path, token)[1]  # the right token: 200 with a body
    ctype, page = _get(base)  # the page holds no data: it asks for the token itself
    assert ctype.startswith("text/html") and b'id="auth"' in page
    metrics = _get(base + "metrics", token)[1].decode()
    counts = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert counts["pmnode_http_refused_total"] >= refused


def test_pmnode_status_command(live_swarm: dict) -> None:
    """The operator's and volunteer's view, through the coordinator's status RPC: behind the page's
    token, as the page is."""
    _, body = _get(live_swarm["base"] + "status", live_swarm["token"])
    status = SwarmStatus.model_validate_json(body)
    cmd = [str(BIN / "pmnode"), "status", "--coordinator-file", str(live_swarm["info"])]
    refused = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and refused.stdout == ""
    assert "needs its HTTP token" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cmd += ["--http-token-file", str(live_swarm["token_file"])]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    via_rpc = SwarmStatus.model_validate_json(out.stdout)
    assert via_rpc.run == status.run and via_rpc.global_step >= status.global_step
    peers = {r.peer_id for s in status.stages for r in s.replicas}
    assert {r.peer_id for s in via_rpc.stages for r in s.replicas} == peers
    table = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert table.returncode == 0, table.stderr
    assert "run tiny" in table.stdout and table.stdout.count("online") == 3 and "(tail)" in table.stdout
    assert all(p[-12:] in table.stdout for p in peers)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_status_page_in_headless_chromium(live_swarm: dict, tmp_path: Path) -> None:
    """The page in a real browser: without the token it asks for it; given the token (#token=, taken
    once into the tab's storage), its script fetched /status and drew the swarm and the loss curve."""
    asks = _chromium("--dump-dom", live_swarm["base"])
    assert '<form id="auth">' in asks.stdout and "enter the token" in asks.stdout, asks.stderr[-2000:]
    assert 'data-ready="1"' not in asks.stdout
    with_token = live_swarm["base"] + "#token=" + live_swarm["token"]
    dom = _chromium("--dump-dom", with_token)
    assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]
    assert dom.stdout.count('class="node online"') == 3
    assert dom.stdout.count('class="stage"') == 3  # no stage marked empty
    assert "<polyline" in dom.stdout and '<div id="error"></div>' in dom.stdout
    shot = tmp_path / "page.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=900,700", with_token)
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (900, 700)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, boxes and a curve, not a blank page
    # The stage boxes' green fill is on screen where the swarm map is drawn.
    assert any(c == (229, 244, 232) for _, c in colors)


def test_status_of_nothing_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "pmnode"), "status", "--coordinator", "/ip4/127.0.0.1/tcp/9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "/p2p/" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([str(BIN / "pmnode"), "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "exactly one of" in out.stderr
