"""Swarm status while a real swarm trains: the RPC behind `pmnode status`, /status, /metrics, the page."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_swarm import BIN, leftovers, swarm_config, tagged_env

from pmnode.status import HistoryPoint, SwarmStatus, thin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_thin_keeps_history_bounded_and_the_newest_points() -> None:
    points = [HistoryPoint(step=i, loss=1.0, time=float(i)) for i in range(5000)]
    kept = thin(points, limit=2000)
    assert len(kept) < 5000 and kept[-1000:] == points[-1000:]
    assert [p.step for p in kept] == sorted(p.step for p in kept)
    assert thin(points[:10]) == points[:10]


def _get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
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


@pytest.mark.slow
def test_status_of_a_training_swarm(tmp_path: Path, toy_corpus: Path) -> None:
    cfg = swarm_config(tmp_path, toy_corpus, train={"steps": 100_000, "eval_every": 5})
    tag = uuid.uuid4().hex
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [
            str(BIN / "pmnode"),
            "local-swarm",
            "--config",
            str(cfg),
            "--stages",
            "3",
            "--schedule",
            "async",
            "--workdir",
            str(work),
            "--http-port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "local-swarm.err").open("w"),  # an unread pipe would fill and block it
        text=True,
        env=tagged_env(tag),
    )
    try:
        info_path = work / "coordinator" / "coordinator.json"
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "local-swarm.err").read_text()[-3000:]
            time.sleep(1)
            if not info_path.exists() or "http" not in json.loads(info_path.read_text()):
                continue
            base = json.loads(info_path.read_text())["http"]
            ctype, body = _get(base + "status")
            status = SwarmStatus.model_validate_json(body)
            trained = [h for h in status.history if h.heldout_loss is not None]
            if all(s.replicas for s in status.stages) and len(status.history) >= 3 and trained:
                break
        assert status is not None and ctype == "application/json"
        assert [s.stage for s in status.stages] == [0, 1, 2]
        assert [s.role for s in status.stages] == ["head", "body", "tail"]
        assert [len(s.replicas) for s in status.stages] == [1, 1, 1]
        assert all(r.state == "online" and r.last_seen_s < 10 for s in status.stages for r in s.replicas)
        assert status.run == "tiny" and status.compression_rank == 8 and status.fingerprint
        assert status.global_step >= 3 and status.loss is not None and status.heldout_loss is not None
        steps = [h.step for h in status.history]
        assert steps == sorted(set(steps))

        # /metrics, scraped and parsed like Prometheus would.
        ctype, body = _get(base + "metrics")
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
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "nope")
        assert e.value.code == 404

        # `pmnode status`, the volunteer's and operator's view, through the coordinator's RPC.
        out = subprocess.run(
            [str(BIN / "pmnode"), "status", "--coordinator-file", str(info_path), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        via_rpc = SwarmStatus.model_validate_json(out.stdout)
        assert via_rpc.run == status.run and via_rpc.global_step >= status.global_step
        assert {r.peer_id for s in via_rpc.stages for r in s.replicas} == {
            r.peer_id for s in status.stages for r in s.replicas
        }
        table = subprocess.run(
            [str(BIN / "pmnode"), "status", "--coordinator-file", str(info_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**tagged_env(tag), "COLUMNS": "160"},
        )
        assert table.returncode == 0, table.stderr
        assert "run tiny" in table.stdout and "online" in table.stdout and "(tail)" in table.stdout

        if CHROMIUM:
            # The page in a real browser: its script must have fetched /status and drawn the swarm.
            dom = _chromium("--dump-dom", base)
            assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]
            assert dom.stdout.count('class="node online"') == 3
            assert "<polyline" in dom.stdout  # the loss curve
            shot = tmp_path / "page.png"
            r = _chromium(f"--screenshot={shot}", "--window-size=900,700", base)
            assert shot.exists(), r.stderr[-2000:]
            from PIL import Image

            img = Image.open(shot).convert("RGB")
            assert img.size == (900, 700)
            colors = img.getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50  # text, boxes and a curve, not a blank page

        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while leftovers(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftovers(tag) == []


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
