#!/usr/bin/env bash
# Regenerates docs/benchmarks/{subspace-sweep,convergence-small,codec-small.json} (about 45 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m benchmarks.sweep_subspace --config configs/small.yaml --steps 300 --out docs/benchmarks/subspace-sweep
pmnode bench convergence --config configs/small.yaml --steps 1000 --out docs/benchmarks/convergence-small \
  --codecs dense,int8,topk:21,topk:6,subspace@64,subspace@32,subspace@16,subspace@8,subspace@4,subspace:int8@16,subspace:int8@4
pmnode bench codec --config configs/small.yaml --json > docs/benchmarks/codec-small.json
