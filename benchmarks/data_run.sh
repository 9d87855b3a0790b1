#!/usr/bin/env bash
# The exact commands of this benchmark (run from the repository root; OUT holds the raw results).
# Prepare throughput: stdlib with bytes, with a BPE trained on it (training included), and with that
# BPE's tokenizer.json given (encoding only). Then configs/bpe-small.yaml, 2,000 steps on one thread,
# dense and subspace, on the BPE data and on the byte data (same model, vocab 256), with samples.
set -euo pipefail
OUT=${OUT:-/tmp/pmnode-data-bench}
mkdir -p "$OUT"

prep() {  # NAME TOKENIZER
  /usr/bin/time -f "%e %U %S" -o "$OUT/prepare-$1.time" nice -n 5 pmnode data prepare stdlib --out "$OUT/stdlib-$1" \
    --tokenizer "$2" --heldout 0.05 --force 2> "$OUT/prepare-$1.err"
}
prep byte byte
prep bpe-4096 bpe:4096
prep bpe-4096-given "$OUT/stdlib-bpe-4096/tokenizer.json"

run() {  # DATA CODEC
  nice -n 5 pmnode train --config configs/bpe-small.yaml --data "$OUT/stdlib-$1" --codec "$2" --threads 1 \
    --summary-json "$OUT/train-$1-$2.json" --checkpoint-dir "$OUT/ckpt-$1-$2" 2> "$OUT/train-$1-$2.err"
  pmnode generate --checkpoint "$OUT/ckpt-$1-$2" --prompt "def " --max-new-tokens 120 --temperature 0.8 \
    --top-k 40 --seed 0 > "$OUT/sample-$1-$2.txt" 2>/dev/null
}
# all four at once (as measured: the machine was shared with other work; tokens/s is per run)
run bpe-4096 dense & run bpe-4096 subspace & run byte dense & run byte subspace & wait

python -m benchmarks.data_report "$OUT"
