#!/usr/bin/env bash
# The whole stack under several gateway configurations side by side, in one device call: one export
# (two model instances, two KV partitions each), then per configuration the GPU suite's stack stage
# only (8 workers: the single stream and 512 streams on /v1/completions SSE), its summary kept as
# $OUT/ab-<label>.md. Every figure of one call comes from the same card and the same model.
#
# Usage: OUT=/tmp/out bash benchmarks/gpu_stack_ab.sh ["label VAR=value ..." ...]
# Default configurations (GATEWAY_MODEL_INSTANCES x GATEWAY_ENGINE_LANES):
#   i1-l1 (one instance, one step in flight), i1-l2 (one instance, two lanes: the default),
#   i2-l1 (two instances on the one GPU, a step loop each), i2-l2 (two instances, two lanes each).
# Knobs: as benchmarks/gpu_suite.sh (SUITE_RUNS, default "single completions"; SUITE_BUDGET_S per
# configuration, default 150; SUITE_REPO, default /tmp/repo-ab).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if (($# == 0)); then
  set -- "i1-l1 GATEWAY_MODEL_INSTANCES=1 GATEWAY_ENGINE_LANES=1" \
    "i1-l2 GATEWAY_MODEL_INSTANCES=1 GATEWAY_ENGINE_LANES=2" \
    "i2-l1 GATEWAY_MODEL_INSTANCES=2 GATEWAY_ENGINE_LANES=1" \
    "i2-l2 GATEWAY_MODEL_INSTANCES=2 GATEWAY_ENGINE_LANES=2"
fi
export SUITE_REPO=${SUITE_REPO:-/tmp/repo-ab} SUITE_EXPORT_ARGS="--instances 2" SUITE_TRITON_ARGS="--instances 2"
export SUITE_SKIP="tests engine hf hf_plain" SUITE_WORKERS=8 SUITE_RUNS=${SUITE_RUNS:-single completions}
for config in "$@"; do
  read -r label settings <<< "$config"
  echo "=== $(date -u +%H:%M:%S) $label: $settings"
  # shellcheck disable=SC2086  # the settings are words on purpose
  env $settings SUITE_LABEL="ab-$label" SUITE_BUDGET_S=${SUITE_BUDGET_S:-150} OUT="$OUT/suites" \
    bash benchmarks/gpu_suite.sh > "$OUT/ab-$label.log" 2>&1
  summary=$(ls -td "$OUT"/suites/*-ab-"$label"* 2> /dev/null | head -1)/summary.md
  cp "$summary" "$OUT/ab-$label.md" 2> /dev/null || tail -n 20 "$OUT/ab-$label.log"
  grep -E "^\| (1\. 512 streams, /v1/completions|3\. single)|^\| 8 \| (single|completions) " "$OUT/ab-$label.md" 2> /dev/null
done
