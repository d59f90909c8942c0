#!/usr/bin/env bash
# Sampling speed on one GPU, in under 8 minutes, building nothing: RAR-B and RAR-XL at batch 128
# with CFG (RAR-B sampling preset), rargen fp32 eager and bf16 + torch.compile + CUDA graphs,
# beside the official generate() in float32 on the same random weights. Writes a markdown table
# to $OUT/gpu_sampling.md when $OUT is set, and to stdout.
#
#   bash benchmarks/gpu.sh [--official DIR] [--device cuda] [--steps 64]
#   PRESETS=rar-tiny BATCH=4 bash benchmarks/gpu.sh --device cpu --steps 2     # CPU dry run
#
# --official DIR is an extracted official tree (default $OFFICIAL or /work/official); without it the
# official rows are skipped. --steps: tokens timed per run (256 = whole images; the table
# extrapolates 256 x per-step time, which flatters the official sampler whose steps grow with t).
set -euo pipefail
cd "$(dirname "$0")/.."
official="${OFFICIAL:-/work/official}"
device=cuda
steps=64
while [ $# -gt 0 ]; do
  case "$1" in
    --official) official="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python}"
args=(--presets "${PRESETS:-rar-b,rar-xl}" --batches "${BATCH:-128}" --steps "$steps" --device "$device"
      --variants "${VARIANTS:-fp32,bf16-compiled}")
if [ -f "$official/modeling/rar.py" ]; then
  args+=(--official "$official")
else
  echo "# official tree not found at $official: official rows skipped (pass --official DIR)"
fi
if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
report="${OUT:+$OUT/gpu_sampling.md}"
PYTHONPATH=src timeout 470 "$python" benchmarks/bench_sampling.py "${args[@]}" | tee "${report:-/dev/null}"
