"""Write the calibration and regime reports of docs/benchmarks/plan/ from the measured JSON files.

python -m benchmarks.plan_report --dir docs/benchmarks/plan
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.calibrate import Measured
from benchmarks.calibrate_report import Variant, write_calibration
from benchmarks.regime import Regime, write_regime
from pmnode.errors import run_cli


def main(
    d: Annotated[Path, typer.Option("--dir", help="The benchmark directory.")] = Path("docs/benchmarks/plan"),
    refit: Annotated[bool, typer.Option(help="Fit again; --no-refit takes calibration.json's fit.")] = True,
) -> None:
    command = f"python -m benchmarks.plan_report --dir {d}"
    if refit:
        runs = [Measured.model_validate(r) for r in json.loads((d / "measured.json").read_text())]
        v = write_calibration(d, runs, command)
        print((d / "calibration.md").read_text())
    else:
        v = Variant.model_validate(json.loads((d / "calibration.json").read_text())["chosen"])
    if (d / "regime.json").exists():
        regime = Regime.model_validate_json((d / "regime.json").read_text())
        write_regime(d, regime, v.fitted, command)
        print((d / "regime.md").read_text())


if __name__ == "__main__":
    run_cli(lambda: typer.run(main))
