"""What `pip install pmnode` ships: every package of the source tree (the list in pyproject.toml is
written by hand, and a package left off it installs a node that fails on its first import), and no
plotting library unless the `bench` extra is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed() -> None:
    tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("pmnode", "coordinator")
        for init in (ROOT / top).rglob("__init__.py")
    }
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    assert tree - listed == set()
    assert listed - tree == {"pmnode.configs"}  # configs/ at the top, mapped by package-dir
    assert PROJECT["tool"]["setuptools"]["package-dir"] == {"pmnode.configs": "configs"}


def test_matplotlib_is_the_bench_extra_only() -> None:
    def names(reqs: list[str]) -> set[str]:
        return {Requirement(r).name for r in reqs}

    extras = PROJECT["project"]["optional-dependencies"]
    assert "matplotlib" not in names(PROJECT["project"]["dependencies"])
    assert names(extras["bench"]) == {"matplotlib"}
    assert "matplotlib" in names(extras["dev"])  # the suite runs the benchmarks, plots included
