#!/usr/bin/env bash
# The GPU benchmark of issue 18 (prepared; not yet run: no GPU was lent to the session that wrote it).
# A 2-stage swarm of llama-1b-shaped stages (d = 2048, 8 layers per stage, vocab 128256) on one GPU,
# dense and subspace, a few hundred sync steps each: tokens/s, MFU per stage, and peak memory against
# `coordinator inspect`'s estimate, written to docs/benchmarks/gpu/ by benchmarks/gpu_report.py.
#
#   bash scripts/gpu_check.sh [STEPS] [OUT]      # defaults: 300 docs/benchmarks/gpu
# CONFIG, DEVICE, SEQ, BF16 override configs/llama-1b.yaml, cuda, 1024, --bf16 (a CPU smoke run:
#   CONFIG=configs/tiny.yaml DEVICE=cpu SEQ=64 BF16= bash scripts/gpu_check.sh 5 /tmp/gpu-smoke).
# Every process is on 127.0.0.1 and is stopped on exit; each run is bounded by `timeout`.
set -euo pipefail
STEPS=${1:-300}
OUT=${2:-docs/benchmarks/gpu}
CONFIG=${CONFIG:-configs/llama-1b.yaml}
DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-1024}
BF16=${BF16---bf16}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
if [ "$DEVICE" = cpu ]; then echo cpu > "$WORK/gpu.txt"; else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"; fi

run() {  # $1: codec (dense | subspace)
  local codec=$1 dir=$WORK/$1
  mkdir -p "$dir"
  python - "$codec" "$STEPS" "$dir/run.yaml" "$CONFIG" "$SEQ" <<'PY'
import sys, yaml
from pmnode.config import load_config
codec, steps, out, config, seq = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
cfg = load_config(config).with_overrides(
    n_stages=2,
    stage_layers=None,
    subspace={"enabled": codec == "subspace"},
    train={"steps": steps, "batch_size": 8, "micro_batch_size": 4, "seq_len": seq, "eval_every": 10**6},
)
yaml.safe_dump(cfg.model_dump(mode="json"), open(out, "w"))
PY
  coordinator inspect --config "$dir/run.yaml" --json --no-fingerprint > "$dir/inspect.json"
  coordinator serve --config "$dir/run.yaml" --state-dir "$dir/coord" > "$dir/coordinator.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 300); do [ -f "$dir/coord/coordinator.json" ] && break; sleep 0.2; done
  for s in 1 0; do
    timeout 3000 pmnode join --coordinator-file "$dir/coord/coordinator.json" --stage $s --device "$DEVICE" \
      $BF16 --log-format json --summary-json "$dir/node-$s.json" > "$dir/node-$s.log" 2>&1 &
    PIDS+=($!)
  done
  wait "${PIDS[-1]}" "${PIDS[-2]}"
  kill "${PIDS[-3]}" 2>/dev/null || true
}

run dense
run subspace
python -m benchmarks.gpu_report "$WORK" "$OUT" --precision "${BF16:+bf16}" \
  --command "CONFIG=$CONFIG DEVICE=$DEVICE SEQ=$SEQ BF16=$BF16 bash scripts/gpu_check.sh $STEPS $OUT"
