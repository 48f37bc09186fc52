#!/usr/bin/env bash
# One whole GPU measurement, run on the H100 machine through the device tool (see docs/benchmarks.md):
#   1. the Triton parity tests in fp16 with every node on the GPU (CPU fallback disabled);
#   2. export of the GPT-2 124M shape in fp16, strict device, with its parity figures;
#   3. the whole stack (embedded Triton + gateway workers) under load: single stream, 512 concurrent
#      generations, the seed article's three scenarios;
#   4. the plain-transformers baseline on the same card in the same run.
# Everything lands in $OUT/results.tar.gz plus $OUT/session.log. Wheels are staged in /root/site.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
R=/tmp/results
mkdir -p "$R" "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
. "$(dirname "$0")/gpu_env.sh"
WORKERS=${WORKERS:-8}
stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

stage "environment"
nvidia-smi -L
$PY -c "import numpy, onnxruntime as ort, torch, transformers; print('numpy', numpy.__version__, '| ort', ort.__version__, ort.get_available_providers(), '| torch', torch.__version__, '| transformers', transformers.__version__)"

stage "1. parity tests on the GPU (fp16, strict device)"
GPT2_TEST_DTYPE=fp16 GPT2_TEST_DEVICE=cuda GPT2_TEST_STRICT=1 timeout 240 $PY -m pytest \
  tests/integration/test_triton_model.py -q -p no:cacheprovider -W ignore::pytest.PytestConfigWarning 2>&1 | tee "$R/gpu_parity_tests.log"

stage "2. export GPT-2 124M shape, fp16, strict device"
timeout 240 $PY -m export --random-config gpt2 --dtype fp16 --device cuda --strict-device \
  --kv-capacity 640 --default-window 64 --repository /tmp/repo --name gpt2 2>&1 | grep -v "parity step" | tee "$R/export_gpt2_fp16.log"
cp /tmp/repo/gpt2/1/metadata.json "$R/metadata_gpt2_fp16.json" || { tar -czf "$OUT/results.tar.gz" -C "$R" .; exit 1; }

stage "3. start Triton + $WORKERS gateway workers"
$PY -m embedded_triton --repository /tmp/repo > "$R/triton.log" 2>&1 &
TRITON=$!
for _ in $(seq 180); do curl -sf localhost:8000/v2/health/ready >/dev/null && break; kill -0 $TRITON || break; sleep 1; done
GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY=/tmp/repo GATEWAY_MAX_RUNNING=640 GATEWAY_HOST=127.0.0.1 \
  $PY -m frontend --port 8080 --workers "$WORKERS" > "$R/gateway.log" 2>&1 &
GATEWAY=$!
for _ in $(seq 120); do curl -sf localhost:8080/health/ready >/dev/null && break; kill -0 $GATEWAY || break; sleep 1; done
curl -sf localhost:8080/health/ready || { tail -n 30 "$R/triton.log" "$R/gateway.log"; tar -czf "$OUT/results.tar.gz" -C "$R" .; exit 1; }
echo
LOAD="$PY -m benchmarks.load --base-url http://127.0.0.1:8080 --out $R"

stage "3a. single stream (TTFT, inter-token latency)"
timeout 120 $LOAD --endpoint stream --concurrency 1 --requests 30 --max-new-tokens 128 --prompt-tokens 32 \
  --temperature 0.8 --top-k 50 --warmup 3 --tag h100_single_stream
stage "3b. 512 concurrent generations"
timeout 150 $LOAD --endpoint generate --concurrency 512 --requests 2 --max-new-tokens 128 --prompt-tokens 32 \
  --temperature 0.8 --top-k 50 --warmup 8 --tag h100_concurrency_512
stage "3c. seed scenarios"
timeout 120 $LOAD --scenario all --endpoint generate --temperature 0.8 --top-k 50 --tag h100_seed_generate
timeout 120 $LOAD --scenario all --endpoint batch --temperature 0.8 --top-k 50 --tag h100_seed_batch
curl -s localhost:8080/metrics | grep -E "^gateway_(step_rows|step_duration_seconds)_(sum|count)|^gateway_full_row" > "$R/gateway_metrics.txt"
curl -s localhost:8002/metrics | grep -E "^(gpt2_|nv_inference_(count|exec_count|request_success))" > "$R/triton_metrics.txt"
kill -INT $GATEWAY; sleep 2; kill $TRITON; wait $TRITON 2>/dev/null

stage "4. plain transformers baseline, same card"
timeout 180 $PY -m benchmarks.baseline --random-config gpt2 --device cuda --dtype fp16 \
  --batch-sizes 1,8,32,128,512 --prompt-tokens 32 --new-tokens 128 --out "$R" --tag h100_transformers_baseline

stage "done"
tar -czf "$OUT/results.tar.gz" -C "$R" .
ls -la "$R"
