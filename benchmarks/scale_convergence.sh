#!/usr/bin/env bash
# What replica sync costs in learning: R = 4 replicas of every stage against exact sums, equal tokens.
# Two configs as shipped (tiny, small); each outer variant against its config's R = 1 run (exact sums).
set -euo pipefail
O=replica_sync.method=outer
run() { pmnode bench convergence --threads 1 --eval-points 10 "$@"; }
T=docs/benchmarks/scale/convergence-tiny
S=docs/benchmarks/scale/convergence-small
run --config tiny --out $T --tokens 400000 --codecs default
run --config tiny --out $T --tokens 400000 --replicas 4 \
  --codecs "default+$O+replica_sync.compressor=topk+replica_sync.inner_steps=1,default+$O+replica_sync.compressor=none+replica_sync.inner_steps=1"
run --config small --out $S --tokens 160000 --eval-points 8 --codecs default
run --config small --out $S --tokens 160000 --eval-points 8 --replicas 4 --codecs "default+$O+replica_sync.compressor=topk+replica_sync.inner_steps=1"
# Not run this session (the shared 2-core machine ran out of time): PowerSGD and top-k at H = 4 on tiny:
# run --config tiny --out $T --tokens 400000 --replicas 4 \
#   --codecs "default+$O+replica_sync.compressor=powersgd+replica_sync.inner_steps=1,default+$O+replica_sync.compressor=topk+replica_sync.inner_steps=4"
