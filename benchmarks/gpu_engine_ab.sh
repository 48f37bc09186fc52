#!/usr/bin/env bash
# Step-engine variants on the GPU machine (after staging, see docs/benchmarks.md): export the
# GPT-2 124M shape in fp16 with strict device (the export-time parity check runs through CUDA
# graphs), then the engine alone at 1/64/512 rows in each variant, kernel tables for the default.
# Variants: the default (CUDA graphs, torch tail, XQA up to 64 rows), the graph's own tail, XQA at
# every size, no CUDA graphs. Results: $OUT/engine.tgz.
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/engine"
. benchmarks/gpu_env.sh
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
REPO=${SUITE_REPO:-/tmp/repo}
stage export
test -d $REPO/gpt2/1 || timeout 300 $PY -m export --random-config gpt2 --dtype fp16 --strict-device \
  --kv-capacity 640 --default-window 64 --repository $REPO --name gpt2 2>&1 | tail -3
bench() {  # tag, extra args...
  local tag=$1; shift
  stage "engine $tag"
  timeout 120 $PY -m benchmarks.engine_bench $REPO/gpt2/1 --rows 1,64,512 --capacity 640 --device cuda \
    --strict-device --out "$OUT/engine/$tag" --tag "$tag" "$@" 2>&1 | grep -E "^\| [0-9]|rror"
}
bench default --engine-kw cuda_graphs=true --profile 1,512
bench graphtail --engine-kw cuda_graphs=true --engine-kw torch_tail=false
bench allxqa --engine-kw cuda_graphs=true --engine-kw xqa_max_rows=1024
bench eager --engine-kw cuda_graphs=false
cd "$OUT" && tar -czf engine.tgz engine && ls "$OUT/engine" | head -30
