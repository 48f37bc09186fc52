#!/usr/bin/env bash
# Follow-up GPU measurement: how the number of gateway worker processes changes latency and
# throughput on the same card, with Triton's own queue/compute split captured per run.
# Assumes gpu_session.sh's staging (/root/site, /root/np1). Results: $OUT/workers.tar.gz.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/workers
mkdir -p "$R" "$OUT"
exec > >(tee "$OUT/workers.log") 2>&1
. "$(dirname "$0")/gpu_env.sh"
save() { tar -czf "$OUT/workers.tar.gz" -C "$R" .; }

$PY -m export --random-config gpt2 --dtype fp16 --device cuda --strict-device --kv-capacity 640 \
  --repository /tmp/repo --name gpt2 --skip-parity 2>&1 | tail -n 2
$PY -m embedded_triton --repository /tmp/repo > "$R/triton.log" 2>&1 &
TRITON=$!
for _ in $(seq 120); do curl -sf localhost:8000/v2/health/ready >/dev/null && break; sleep 1; done

for W in ${WORKER_COUNTS:-1 4}; do
  GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY=/tmp/repo GATEWAY_MAX_RUNNING=640 \
    $PY -m frontend --port 8080 --workers "$W" > "$R/gateway_w$W.log" 2>&1 &
  GW=$!
  for _ in $(seq 60); do curl -sf localhost:8080/health/ready >/dev/null && break; sleep 1; done
  LOAD="$PY -m benchmarks.load --base-url http://127.0.0.1:8080 --out $R --temperature 0.8 --top-k 50"
  curl -s localhost:8002/metrics | grep -E "^nv_inference_(exec_count|request_success|queue_duration_us|compute_infer_duration_us|count)\{" > "$R/triton_before_w$W.txt"
  timeout 60 $LOAD --endpoint stream --concurrency 1 --requests 10 --max-new-tokens 128 --prompt-tokens 32 --tag "w${W}_single"
  timeout 60 $LOAD --scenario light --endpoint generate --tag "w${W}"
  timeout 90 $LOAD --endpoint generate --concurrency 512 --requests 1 --max-new-tokens 128 --prompt-tokens 32 --warmup 0 --tag "w${W}_c512"
  curl -s localhost:8002/metrics | grep -E "^nv_inference_(exec_count|request_success|queue_duration_us|compute_infer_duration_us|count)\{" > "$R/triton_after_w$W.txt"
  curl -s localhost:8080/metrics | grep -E "^gateway_step_(rows|duration_seconds)_(sum|count)" > "$R/gateway_metrics_w$W.txt"
  kill -INT $GW; wait $GW 2>/dev/null
  save
done
kill $TRITON; wait $TRITON 2>/dev/null
save
