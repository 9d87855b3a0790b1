#!/usr/bin/env bash
# The project's checks, in the order CI runs them (.ci/run and the README's test command both call
# this): lint, formatting and types first, since they take seconds and the suite takes many minutes.
# Arguments go to pytest, e.g. scripts/check.sh tests/test_config.py -n 0; --long adds the multi-minute
# scenarios CI leaves out (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(pmnode coordinator tests scripts benchmarks)
ruff check "${paths[@]}"
ruff format --check "${paths[@]}"
mypy  # pmnode and coordinator, as pyproject.toml configures it ([tool.mypy])
pytest -q "$@"
