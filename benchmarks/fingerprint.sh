#!/usr/bin/env bash
# Bit-identity fingerprints of rargen's observable outputs, through the command line and the public
# API only, so that one script runs on two commits whatever their internal layout: a tokenizer
# trained, a store, a generator trained straight and resumed from its step-20 checkpoint, samples
# plain and with --speculate 4, one server answer, and generate/token_probs in Python.
# usage: bash benchmarks/fingerprint.sh REPO OUTDIR   (REPO has its .venv: make venv; ~3 min)
# Two commits give the same outputs when their fingerprints.txt are equal.
set -euo pipefail
REPO=$(cd "$1" && pwd); OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=1 PYTHONHASHSEED=0
R="$REPO/.venv/bin/rargen"; PY="$REPO/.venv/bin/python"
cd "$OUT"
$R train-tokenizer --data digits --out tok --steps 30 --threads 1 --no-progress > log.txt 2>&1
$R pretokenize --data digits --tokenizer tok/tokenizer --out store --threads 1 >> log.txt 2>&1
$R train --data store --out gen --tokenizer tok/tokenizer --steps 40 --checkpoint-every 20 --threads 1 --no-progress >> log.txt 2>&1
# resume: keep only the step-20 checkpoint, then continue to 40
cp -r gen gen2; rm -rf gen2/final
ls gen2/checkpoints
for d in gen2/checkpoints/*; do case "$d" in *20*) ;; *) rm -rf "$d";; esac; done
$R train --data store --out gen2 --tokenizer tok/tokenizer --steps 40 --checkpoint-every 20 --threads 1 --no-progress --resume >> log.txt 2>&1
$R sample gen/final --tokenizer tok/tokenizer --per-class 2 --cfg-scale 3 --out s1 --threads 1 >> log.txt 2>&1 || $R sample gen/final --tokenizer tok/tokenizer --per-class 2 --cfg-scale 3 --out s1 >> log.txt 2>&1
$R sample gen/final --tokenizer tok/tokenizer --per-class 2 --cfg-scale 3 --out s2 --speculate 4 >> log.txt 2>&1
PORT=$((20000 + RANDOM % 20000))
$R serve gen/final --tokenizer tok/tokenizer --port $PORT >> serve.log 2>&1 & SP=$!
for i in $(seq 60); do curl -s -H "Host: 127.0.0.1" 127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
curl -s -H "Host: 127.0.0.1" -X POST 127.0.0.1:$PORT/generate -d '{"class": 3, "seed": 7, "batch_size": 2, "cfg_scale": 2}' > serve.json
kill -INT $SP; wait $SP || true
$PY - <<'PY' > api.txt
import hashlib, json, torch, rargen
m = rargen.load("gen/final")
cfg = rargen.SampleConfig(cfg_scale=2.0)
t = rargen.generate(m, torch.tensor([1, 2, 3, 4]), cfg, generator=torch.Generator().manual_seed(5))
p = rargen.token_probs(m, torch.tensor([1, 2, 3, 4]), t, cfg)
h = lambda x: hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]
print("api tokens", h(t)); print("api probs", h(p.float()))
PY
{
  echo "tok $(sha256sum tok/tokenizer/*.safetensors | cut -c1-16)"
  echo "gen final $(sha256sum gen/final/*.safetensors | cut -c1-16)"
  echo "gen resumed $(sha256sum gen2/final/*.safetensors | cut -c1-16)"
  echo "samples $(sha256sum s1/samples.npz | cut -c1-16)"
  echo "samples speculate4 $(sha256sum s2/samples.npz | cut -c1-16)"
  echo "serve pixels $($PY -c "import json,hashlib;d=json.load(open('serve.json'));print(hashlib.sha256(json.dumps(d['images']).encode()).hexdigest()[:16])")"
  cat api.txt
} > fingerprints.txt
cat fingerprints.txt
