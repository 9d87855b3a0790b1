"""Regime-matched real runs (docs/benchmarks/plan/regime.json); see benchmarks.regime.

python -m benchmarks.plan_regime --out docs/benchmarks/plan/regime.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from benchmarks.regime import run_regime
from pmnode.errors import run_cli


def main(out: Annotated[Path, typer.Option(help="JSON file for the runs and the settings.")]) -> None:
    run_regime(out, Console(stderr=True))


if __name__ == "__main__":
    run_cli(lambda: typer.run(main))
