#!/usr/bin/env bash
# The sampler's speed at two commits, interleaved in one run on one host (before, after, before,
# after ...), so that load on a shared host hits both alike: bench_sampling.py (RAR-B, random
# weights, 64 steps at batches 1 and 8) and bench_speculative.py (a trained generator).
# usage: bash benchmarks/before_after.sh BEFORE_REPO AFTER_REPO GENERATOR [ROUNDS]
#   (each repo a checkout with its .venv; GENERATOR a checkpoint folder, e.g. runs/demo/generator)
set -uo pipefail
BEFORE=$1; AFTER=$2; GEN=$3; ROUNDS=${4:-2}
export OMP_NUM_THREADS=2
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    REPO=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
    echo "=== round $round $side ($(git -C "$REPO" rev-parse --short HEAD)) bench_sampling"
    (cd "$REPO" && PYTHONPATH=src .venv/bin/python benchmarks/bench_sampling.py --steps 64 --batches 1,8 --threads 2 2>&1 | tail -8)
    echo "=== round $round $side bench_speculative"
    (cd "$REPO" && PYTHONPATH=src .venv/bin/python benchmarks/bench_speculative.py "$GEN" --batches 1,8 --speculate 4,8 --repeats 1 --threads 2 2>&1 | tail -8)
  done
done
