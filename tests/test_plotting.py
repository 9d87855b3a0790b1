"""matplotlib is the optional `bench` extra: without it, a benchmark that plots says in one line how
to install it and exits 1, before running anything. The missing module is simulated in-process
(sys.modules[name] = None makes `import name` fail as if it were not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from launch import TINY

from pmnode.bench.plotting import MissingExtraError, pyplot

HINT = "pip install 'pmnode[bench]'"


@pytest.fixture()
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_pyplot_when_installed() -> None:
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"  # files only: no display on a benchmark machine


def test_pyplot_without_matplotlib(no_matplotlib: None) -> None:
    with pytest.raises(MissingExtraError) as e:
        pyplot()
    assert HINT in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args",
    [
        ["convergence", "--config", TINY, "--steps", "2"],
        ["swarm", "--config", TINY, "--steps", "2"],
        ["time-to-loss", "--config", TINY, "--steps", "2"],
    ],
    ids=["convergence", "swarm", "time-to-loss"],
)
def test_bench_command_without_matplotlib(
    args: list[str],
    no_matplotlib: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pmnode.cli.main import main

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["pmnode", "bench", *args, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and HINT in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any run started
