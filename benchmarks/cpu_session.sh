#!/usr/bin/env bash
# The CPU target, measured on one machine in one run: the whole stack (embedded Triton + one
# gateway worker, GPT-2 124M shape, fp32) against plain transformers `generate`, 24-token
# prompts, 64 new tokens, concurrency / batch 1, 4, 16, top-k 50 sampling in both.
# Usage: bash benchmarks/cpu_session.sh [OUT_DIR]   (needs `make setup`; takes ~10 minutes)
set -u -o pipefail
OUT=${1:-docs/results/$(date -u +%Y-%m-%d)-cpu}
PY=${PY:-.venv/bin/python}
REPO=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $GW $TRITON 2>/dev/null; rm -rf "$REPO"' EXIT
$PY -m export --random-config gpt2 --dtype fp32 --kv-capacity 20 --repository "$REPO" --name gpt2 2>&1 | grep -E "parity OK|wrote"
$PY -m embedded_triton --repository "$REPO" --http-port 18700 --grpc-port 18701 --metrics-port 18702 > "$OUT/triton.log" 2>&1 &
TRITON=$!
for _ in $(seq 120); do curl -sf localhost:18700/v2/health/ready >/dev/null && break; sleep 1; done
GATEWAY_TRITON_URL=127.0.0.1:18701 GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY="$REPO" \
  $PY -m frontend --port 18710 > "$OUT/gateway.log" 2>&1 &
GW=$!
for _ in $(seq 120); do curl -sf localhost:18710/health/ready >/dev/null && break; sleep 1; done
TOK="$REPO/gpt2/1/tokenizer"
for C in 1 4 16; do
  $PY -m benchmarks.load --base-url http://127.0.0.1:18710 --endpoint stream --concurrency $C --requests $((C < 4 ? 6 : 3)) \
    --max-new-tokens 64 --prompt-tokens 24 --tokenizer "$TOK" --temperature 0.8 --top-k 50 --think-time-s 0 \
    --warmup 1 --out "$OUT" --tag cpu_stack 2>&1 | grep -E "^\| closed"
done
kill $GW; wait $GW 2>/dev/null; kill $TRITON; wait $TRITON 2>/dev/null
$PY -m benchmarks.baseline --random-config gpt2 --device cpu --dtype fp32 --batch-sizes 1,4,16 --prompt-tokens 24 \
  --new-tokens 64 --top-k 50 --top-p 1.0 --temperature 0.8 --repeats 2 --out "$OUT" --tag cpu_transformers 2>&1 | grep -E "^\|"
