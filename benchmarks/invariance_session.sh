#!/usr/bin/env bash
# Issue 15's end-to-end check in one run: the GPT-2 124M shape (random weights) exported, one embedded
# Triton, and the same seeded requests (benchmarks/invariance_check.py) in three phases, each against
# a freshly started gateway (empty result cache): alone; beside OTHER unseeded streams; through a
# `--workers 2` gateway beside the same streams. Writes the phases' JSON and invariance.md.
#
# Usage: bash benchmarks/invariance_session.sh [OUT_DIR]   (needs `make setup`)
# Knobs: PY (.venv/bin/python), INV_DEVICE (cpu; cuda on the GPU machine), INV_REQUESTS (100),
#        INV_OTHER (64 other streams), INV_TOKENS (128), INV_EXPORT_ARGS (e.g. "--invariant-slots 32" on a GPU).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-docs/results/$(date -u +%Y-%m-%d)-invariance}
PY=${PY:-.venv/bin/python}
DEVICE=${INV_DEVICE:-cpu}
REQUESTS=${INV_REQUESTS:-100}
OTHER=${INV_OTHER:-64}
TOKENS=${INV_TOKENS:-128}
DTYPE=fp32
[ "$DEVICE" = cuda ] && DTYPE=fp16
REPO=$(mktemp -d)
TRITON="" GW=""
mkdir -p "$OUT"
exec > >(tee "$OUT/invariance_session.log") 2>&1
trap 'kill $GW $TRITON 2>/dev/null; rm -rf "$REPO"' EXIT
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
start_gateway() { # $@: extra flags for python -m frontend
  GATEWAY_TRITON_URL=127.0.0.1:18801 GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY="$REPO" GATEWAY_IP_RPM=0 \
    GATEWAY_MAX_RUNNING=$((REQUESTS + OTHER + 8)) GATEWAY_MAX_WAITING=4096 GATEWAY_REQUEST_TIMEOUT_S=1800 \
    setsid "$PY" -m frontend --port 18810 "$@" >> "$OUT/gateway.log" 2>&1 &
  GW=$!
  for _ in $(seq 180); do curl -sf localhost:18810/health/ready > /dev/null && return 0; sleep 1; done
  tail -n 30 "$OUT/gateway.log"
  return 1
}
stop_gateway() {
  kill -TERM -- -"$GW" 2> /dev/null
  wait "$GW" 2> /dev/null
  GW=""
}
phase() { # name, other streams
  stage "phase $1: $REQUESTS seeded requests beside $2 other streams"
  "$PY" -m benchmarks.invariance_check --base-url http://127.0.0.1:18810 --requests "$REQUESTS" \
    --max-tokens "$TOKENS" --other-streams "$2" --out "$OUT/$1.json"
}

stage "export the GPT-2 124M shape, $DTYPE, $DEVICE"
# shellcheck disable=SC2086  # INV_EXPORT_ARGS are words on purpose
"$PY" -m export --random-config gpt2 --dtype "$DTYPE" --device "$DEVICE" --kv-capacity $((REQUESTS + OTHER + 8)) \
  --repository "$REPO" --name gpt2 ${INV_EXPORT_ARGS:-} 2>&1 | grep -E "parity OK|wrote|^error|Error"
stage "start Triton"
"$PY" -m embedded_triton --repository "$REPO" --http-port 18800 --grpc-port 18801 --metrics-port 18802 \
  > "$OUT/triton.log" 2>&1 &
TRITON=$!
for _ in $(seq 180); do curl -sf localhost:18800/v2/health/ready > /dev/null && break; sleep 1; done
start_gateway || exit 1
phase alone 0
stop_gateway
start_gateway || exit 1
phase beside "$OTHER"
stop_gateway
start_gateway --workers 2 || exit 1
phase workers2 "$OTHER"
stop_gateway
{
  echo "# Seeded requests alone, beside other traffic, through --workers 2 ($(date -u +%Y-%m-%d), $DEVICE, $DTYPE)"
  echo
  echo "GPT-2 124M shape, random weights; $REQUESTS seeded /v1/completions requests of $TOKENS tokens (logprobs 1,"
  echo "ignore_eos; temperature 0-1.2, top-p, top-k, penalties, one in eight greedy), 16 at a time; each phase"
  echo "against a freshly started gateway (GATEWAY_BATCH_INVARIANT=auto). Made by benchmarks/invariance_session.sh."
  echo "Machine: $(nproc) CPUs, $(uname -m); commit $(git rev-parse --short HEAD 2> /dev/null)."
  echo
  "$PY" -m benchmarks.invariance_check --compare "$OUT/alone.json" "$OUT/beside.json" "$OUT/workers2.json"
} > "$OUT/invariance.md"
RC=$?
cat "$OUT/invariance.md"
exit $RC
