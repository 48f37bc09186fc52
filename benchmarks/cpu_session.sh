#!/usr/bin/env bash
# The CPU target, measured on one machine in one run: the whole stack (embedded Triton + one
# gateway worker, GPT-2 124M shape, fp32, streamed over HTTP) against plain transformers `generate`,
# 24-token prompts, 64 new tokens, temperature 0.8, concurrency / batch 1, 4 and 16, once with
# top-p 0.9 (top-k off) and once with top-k 50 (top-p off), the same sampling on both sides.
# Writes the load / baseline reports and cpu_summary.md (ours vs transformers, met / missed).
#
# Usage: bash benchmarks/cpu_session.sh [OUT_DIR]   (needs `make setup`; about 10 minutes on 2 cores)
# Knobs: PY (.venv/bin/python), CPU_MODEL (gpt2; `tiny` for a quick smoke run of the plumbing),
#        CPU_CONCURRENCY ("1 4 16"), CPU_MODES ("topp topk").
set -u -o pipefail
OUT=${1:-docs/results/$(date -u +%Y-%m-%d)-cpu}
PY=${PY:-.venv/bin/python}
MODEL=${CPU_MODEL:-gpt2}
CONCURRENCY=${CPU_CONCURRENCY:-1 4 16}
MODES=${CPU_MODES:-topp topk}
REPO=$(mktemp -d)
GW="" TRITON=""
mkdir -p "$OUT"
exec > >(tee "$OUT/cpu_session.log") 2>&1
trap 'kill $GW $TRITON 2>/dev/null; rm -rf "$REPO"' EXIT
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
sampling() { # the same sampling flags for benchmarks.load and benchmarks.baseline
  case $1 in
    topp) echo "--top-p 0.9 --top-k 0" ;;
    topk) echo "--top-k 50 --top-p 1.0" ;;
    *) echo "unknown mode $1" >&2 && return 1 ;;
  esac
}

stage "export $MODEL, fp32"
$PY -m export --random-config "$MODEL" --dtype fp32 --device cpu --kv-capacity 20 --repository "$REPO" --name gpt2 \
  2>&1 | grep -E "parity OK|wrote|^error|Error"
stage "start Triton + one gateway worker"
$PY -m embedded_triton --repository "$REPO" --http-port 18700 --grpc-port 18701 --metrics-port 18702 \
  > "$OUT/triton.log" 2>&1 &
TRITON=$!
for _ in $(seq 120); do curl -sf localhost:18700/v2/health/ready > /dev/null && break; sleep 1; done
GATEWAY_TRITON_URL=127.0.0.1:18701 GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY="$REPO" \
  $PY -m frontend --port 18710 > "$OUT/gateway.log" 2>&1 &
GW=$!
for _ in $(seq 120); do curl -sf localhost:18710/health/ready > /dev/null && break; sleep 1; done
curl -sf localhost:18710/health/ready > /dev/null || { tail -n 20 "$OUT/triton.log" "$OUT/gateway.log"; exit 1; }
TOK="$REPO/gpt2/1/tokenizer"
for MODE in $MODES; do
  read -r -a FLAGS <<< "$(sampling "$MODE")"
  for C in $CONCURRENCY; do
    stage "stack, $MODE, concurrency $C"
    $PY -m benchmarks.load --base-url http://127.0.0.1:18710 --endpoint stream --concurrency "$C" \
      --requests $((C < 4 ? 6 : 3)) --max-new-tokens 64 --prompt-tokens 24 --tokenizer "$TOK" --temperature 0.8 \
      "${FLAGS[@]}" --think-time-s 0 --warmup 1 --out "$OUT" --tag "cpu_stack_$MODE" 2>&1 | grep -E "^\| closed"
  done
done
curl -s localhost:18710/metrics | grep -E "^gateway_(step_rows|full_row)" | grep -v _created > "$OUT/gateway_metrics.txt"
kill $GW; wait $GW 2> /dev/null; kill $TRITON; wait $TRITON 2> /dev/null
GW="" TRITON=""
BATCHES=$(echo $CONCURRENCY | tr ' ' ',')
for MODE in $MODES; do
  read -r -a FLAGS <<< "$(sampling "$MODE")"
  stage "transformers generate, $MODE, batch $BATCHES"
  $PY -m benchmarks.baseline --random-config "$MODEL" --device cpu --dtype fp32 --batch-sizes "$BATCHES" \
    --prompt-tokens 24 --new-tokens 64 --temperature 0.8 "${FLAGS[@]}" --repeats 2 --out "$OUT" \
    --tag "cpu_transformers_$MODE" 2>&1 | grep -E "^\| [0-9]"
done
stage summary
$PY -m benchmarks.cpu_summary "$OUT"
