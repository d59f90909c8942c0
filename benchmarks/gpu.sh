#!/usr/bin/env bash
# The GPU check, one script, under 10 minutes on one H200, building nothing. It writes markdown
# tables to stdout and, when $OUT is set, to $OUT/gpu_{sampling,training,tokenizer,titok,speculative,int8,512}.md:
#   1. sampling (<= 200 s): RAR-B and RAR-XL at batch 128 with CFG (RAR-B sampling preset), rargen
#      fp32 eager and bf16 + torch.compile + CUDA graphs, beside the official generate() in
#      float32 on the same random weights (goal: 200 images/s for RAR-XL, >= 20x the official);
#   2. training (<= 120 s): tokens/s and MFU of the real training step, bf16, compiled, RAR-B at
#      batch 256 and RAR-XL at 128 per GPU (goal: MFU >= 45%);
#   3. tokenizer (<= 30 s): MaskGIT-VQGAN encode/decode images/s at 256x256;
#   4. titok (<= 70 s): TiTok-L-32 / B-64 / S-128 encode/decode images/s at batch 32, and RAR-B
#      over 256 MaskGIT-VQGAN tokens vs 32 TiTok-L-32 tokens, fp32 eager, batches 1 and 128;
#   5. speculative (<= 40 s): the cost of a speculative pass against a plain step on the device
#      (RAR-B, random weights: acceptance needs a trained model, BENCHMARKS.md), batches 1 and 8;
#   6. int8 (<= 20 s, on the host CPU: int8 decoding is a CPU path): max |dp| and KL vs float64;
#   7. 512 (<= 150 s): RAR-B at 32x32 = 1,024 tokens (rar-b-512, random weights): sampling images/s
#      at batch 32 with CFG, bf16 + compile (the table extrapolates 1,024 x per-step time), and one
#      training step's tokens/s and MFU at batch 64, bf16, compiled.
# The official tree cannot be committed: copy an extracted checkout into the git-ignored
# .official/ folder and carry it to the GPU machine, or pass --official DIR.
#
#   bash benchmarks/gpu.sh [--official DIR] [--device cuda] [--steps 64]
#   PRESETS=rar-tiny BATCH=4 SPEC_PRESET=rar-tiny bash benchmarks/gpu.sh --device cpu --steps 2  # CPU dry run
#
# --official DIR is an extracted official tree (default $OFFICIAL or /work/official); without it the
# official rows are skipped. --steps: tokens timed per run (256 = whole images; the table
# extrapolates 256 x per-step time of the first tokens, which flatters the samplers whose steps
# grow with t: the official one most, rargen's eager fp32 a little, not the fixed-shape compiled one).
set -euo pipefail
cd "$(dirname "$0")/.."
official="${OFFICIAL:-.official}"
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
PYTHONPATH=src timeout 200 "$python" benchmarks/bench_sampling.py "${args[@]}" | tee "${report:-/dev/null}" || true
if [ "$device" = cuda ]; then
  PYTHONPATH=src timeout 120 "$python" benchmarks/gpu_train.py --device cuda --steps 8 \
    | tee "${OUT:-/tmp}/gpu_training.md" || true
  PYTHONPATH=src timeout 30 "$python" benchmarks/bench_tokenizer.py --device cuda --batch 32 \
    | tee "${OUT:-/tmp}/gpu_tokenizer.md" || true
  titok=(--device cuda --tokenizer-batch 32 --batches 1,128 --repeats 2)
else  # the CPU dry run: the same code paths at test sizes
  titok=(--tokenizers titok-test --preset rar-tiny --lengths 16,8 --batches 2)
fi
PYTHONPATH=src timeout 70 "$python" benchmarks/bench_titok.py "${titok[@]}" | tee "${OUT:-/tmp}/gpu_titok.md" || true
speculative=(--random "${SPEC_PRESET:-rar-b}" --batches "${SPEC_BATCHES:-1,8}" --speculate 8 --repeats 2)
PYTHONPATH=src timeout 40 "$python" benchmarks/bench_speculative.py "${speculative[@]}" --device "$device" \
  | tee "${OUT:-/tmp}/gpu_speculative.md" || true
PYTHONPATH=src timeout 20 "$python" benchmarks/bench_precision.py --preset "${INT8_PRESET:-rar-tiny}" --batch 2 \
  --variants fp32,int8 | tee "${OUT:-/tmp}/gpu_int8.md" || true
if [ "$device" = cuda ]; then
  {
    PYTHONPATH=src timeout 90 "$python" benchmarks/bench_sampling.py --presets rar-b-512 --batches 32 \
      --steps "$steps" --device cuda --variants bf16-compiled || true
    PYTHONPATH=src timeout 60 "$python" benchmarks/gpu_train.py --device cuda --presets rar-b-512 --steps 4 || true
  } | tee "${OUT:-/tmp}/gpu_512.md"
fi
