"""The volunteer's view of `pmnode join`: the panel, plain lines and JSON lines."""

from __future__ import annotations

import io
import json
import subprocess

from launch import BIN
from rich.console import Console

from pmnode.swarm.panel import Display, NodeSnapshot, line, render


def snapshot(**kw: object) -> NodeSnapshot:
    base = dict(
        run="tiny",
        peer_id="QmPeerAAAAAAAAAAAAAAAAAAAAAAAAAA12345678",
        stage=1,
        n_stages=4,
        layers=(1, 2),
        role="body",
        device="cpu",
        codec="subspace",
        schedule="async",
        upstream=["QmUpstream00000000000000000000000000aaaaaaaa"],
        downstream=["QmDown0000000000000000000000000000bbbbbbbb", "QmDown00000000000000000000000000cccccccc"],
        step=120,
        target_steps=600,
        samples=960,
        loss=2.3456,
        heldout_loss=None,
        tokens_per_s=8123.4,
        bytes_in_per_s=251_000.0,
        bytes_out_per_s=3_400.0,
        compression=7.76,
        inflight=3,
        errors=0,
        uptime_s=42.0,
    )
    return NodeSnapshot.model_validate({**base, **kw})


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100, color_system=None), buf


def test_panel_shows_what_a_volunteer_asks_about() -> None:
    console, buf = _console(terminal=True)
    console.print(render(snapshot()))
    text = buf.getvalue()
    for expected in (
        "run tiny",
        "1/3 (body), layers 1..1",
        "aaaaaaaa",
        "bbbbbbbb, cccccccc",
        "120/600",
        "960",
        "2.3456",
        "8,123",
        "0.25 MB/s",
        "3.4 kB/s",
        "7.8x vs dense fp32",
        "subspace, async",
    ):
        assert expected in text, expected
    assert "errors" not in text
    console.print(render(snapshot(errors=2)))
    assert "2 errors" in buf.getvalue()


def test_plain_lines_when_not_a_terminal_and_throttled() -> None:
    console, buf = _console(terminal=False)
    d = Display(console, "text", every=60.0)
    assert not d.interactive
    d.show(snapshot())
    d.show(snapshot(step=121))  # within the interval: not printed
    d.close(snapshot(step=122))  # the final state is always printed
    lines = buf.getvalue().splitlines()
    assert lines == [line(snapshot()), line(snapshot(step=122))]
    assert lines[0].startswith("stage 1 step 120/600 samples 960 loss 2.3456 held-out -")


def test_json_lines_parse_back() -> None:
    console, buf = _console(terminal=True)  # json wins even on a terminal
    d = Display(console, "json", every=0.0)
    d.show(snapshot())
    d.show(snapshot(step=121, heldout_loss=2.5))
    rows = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [r["event"] for r in rows] == ["status", "status"]
    assert NodeSnapshot.model_validate({k: v for k, v in rows[1].items() if k != "event"}) == snapshot(
        step=121, heldout_loss=2.5
    )


def test_bad_log_format_is_one_line() -> None:
    out = subprocess.run(
        [str(BIN / "pmnode"), "join", "--coordinator", "/ip4/127.0.0.1/tcp/1/p2p/Qm", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "--log-format: Input should be 'text' or 'json'" in out.stderr
    assert "Traceback" not in out.stderr
