r"""Rebuild pmnode/plan/fidelity_costs.json (what `coordinator inspect` prints as each k's measured
cost) from the fidelity study's committed runs.

    python -m benchmarks.fidelity_costs            # rewrite it from docs/benchmarks/fidelity/*/runs
    python -m benchmarks.fidelity_costs --check    # exit 1 if it is stale

Each runs directory is one corpus and one data order (its name is the corpus label), so every cost
is measured against a baseline trained on the same windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pmnode.bench.fidelity_report import costs_from_runs
from pmnode.plan.advice import COSTS_FILE

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "docs" / "benchmarks" / "fidelity"


def build() -> str:
    costs: list[dict[str, Any]] = []
    for runs in sorted(STUDY.glob("*/runs")):
        costs.extend(c.model_dump(mode="json") for c in costs_from_runs(runs.parent, runs.parent.name))
    return json.dumps(costs, indent=1) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is stale")
    args = parser.parse_args()
    text = build()
    if args.check:
        stale = not COSTS_FILE.is_file() or COSTS_FILE.read_text() != text
        print(f"{COSTS_FILE}: {'stale' if stale else 'up to date'}")
        return int(stale)
    COSTS_FILE.write_text(text)
    print(f"wrote {COSTS_FILE} ({text.count('d_over_k')} measured runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
