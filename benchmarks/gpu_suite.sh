#!/usr/bin/env bash
# The whole GPU measurement of issue 16 in one device call (H100 or H200). From the project root, after
# the staged wheels are installed in /root/site (see ../shared/device/README.md and docs/benchmarks.md):
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh      # results: $OUT/<UTC date>-<label>/ and $OUT/gpu_suite.tgz
#
# It measures every target of issue 16 and the baselines they are ratios of, in the same run, and ends with
# benchmarks.gpu_summary's table: each target met / missed / not run, with both sides of its ratio.
# In this order (each stage under `timeout`; a stage that fails, times out or no longer fits the budget is
# recorded in stages.tsv and the suite goes on; the target-bearing runs come first):
#   0. environment: nvidia-smi, package versions, git commit                       -> env/
#   1. export of the GPT-2 124M shape, fp16, strict device, 640 KV slots in 2 partitions (the gateway's
#      2 lanes: 2 steps in flight), window 64                                        -> export.log
#      (kept when SUITE_REPO already holds one this suite made from the same code), in parallel with
#   2. correctness: the Triton parity suite in fp16 strict device and the seeded-determinism tests of
#      the gateway suite (their own tiny models and servers, on free ports)          -> tests/
#   3. the step engine alone at 1, 64, 512 rows (kernel tables at 1 and 512), then at 1 and 512 rows with
#      every row asking for a device draw (--draw top_p=0.9, targets 2 and 4)       -> engine/
#   4. transformers static cache + compile at batch 1 and 512 (targets 1 and 3)     -> hf/
#   5. the whole stack (embedded Triton + gateway, GATEWAY_MAX_RUNNING=640), Triton's and the gateway's
#      /metrics scraped around every run                                             -> stack_w<W>/
#      8 workers: single stream (/v1/completions SSE, 12 requests; target 3); 512 streams x 6 requests
#        each, closed loop: /v1/completions SSE top-k 50 (1, 5, 6), the seed's default request on the same
#        route (temperature 0.7, top-p 0.9, top-k off; 2), /generate top-k 50 (1); guidellm on
#        /v1/completions with the same load (6; skipped when guidellm is not importable); then, only when
#        the budget still holds the 1-process run, the penalties run and the seed scenarios (report only)
#      1 process (no --workers): 512 streams x 6 on /v1/completions SSE (target 5)
#   6. transformers plain generate at batch 1 and 512 (a reference, when time is left)
#   7. benchmarks.gpu_summary -> summary.md; $OUT/gpu_suite.tgz; summary printed
#
# Wall time: a global budget (SUITE_BUDGET_S, default 540 s: one device call has 600 s) caps every stage's
# timeout and keeps RESERVE_S for the summary and the archive; what no longer fits is skipped (stages.tsv
# says which). At the 2026-12-07 speeds: environment, export || tests ~60 s, engine ~30 s, transformers
# ~45 s, Triton ~10 s, 8-worker gateway ~30 s, single stream ~20 s, each 512-stream run ~30-40 s (its load
# processes' start-up included), guidellm ~45 s, 1-process gateway ~10 s + its run ~80 s: about 500 s,
# the report-only runs and plain transformers in what is left.
#
# Knobs: OUT (/tmp/out), SUITE_LABEL (the card, from nvidia-smi), SUITE_REPO (/tmp/repo), SUITE_BUDGET_S
# (540), SUITE_CHECKPOINT (a checkpoint directory to export instead of random weights), SUITE_TESTS (the correctness suites, default "triton_model gateway_seeded instances"), SUITE_WORKERS ("8 1": gateway worker counts, in order; 1 = one process), SUITE_FRESH_EXPORT=1
# (export again even when SUITE_REPO has a model), SUITE_SKIP (stages to leave out, any of "tests engine hf
# stack hf_plain"; recorded), SUITE_RUNS (the runs with several workers, default "single completions topp
# streams guidellm penalty seed"), SUITE_RUNS_ONE (with one process, default "completions"),
# SUITE_STREAM_REQUESTS (6 per user in the many-stream runs; the steady window needs 2 or more),
# SUITE_LOAD_PROCESSES (8: load-generator processes of the many-user runs), SUITE_OUTSIDE_PATH (prepended
# to PYTHONPATH for guidellm only, when its wheels live apart), SUITE_OUTSIDE_PROCESSES (guidellm's worker
# processes; default guidellm's own, 10), SUITE_EXPORT_ARGS / SUITE_TRITON_ARGS (more flags for the export and
# for `python -m embedded_triton`, e.g. "--instances 2" for both: two model instances on the one GPU); the
# gateway takes its GATEWAY_* settings from the environment (e.g. GATEWAY_MODEL_INSTANCES, GATEWAY_ENGINE_LANES).
# For a dry run without a GPU: SUITE_DEVICE=cpu SUITE_MODEL=tiny SUITE_PY=.venv/bin/python
# SUITE_STREAMS=32 SUITE_LABEL=cpu-dry (fp32, no strict device; figures meaningless, plumbing real).
set -u -o pipefail
set +m # no job control: background jobs stay in our process group, `setsid` below execs in place
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
LABEL=${SUITE_LABEL:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1 |
  grep -oiE 'H100|H200|A100|L4|L40S?' | head -1 | tr 'A-Z' 'a-z')}
R="$OUT/$(date -u +%Y-%m-%d)-${LABEL:-gpu}"
[ -e "$R" ] && R="$R-$(date -u +%H%M%S)" # never mix two runs' files
REPO=${SUITE_REPO:-/tmp/repo}
BUDGET_S=${SUITE_BUDGET_S:-540}
RESERVE_S=25 # kept for the summary and the archive
WORKER_COUNTS=${SUITE_WORKERS:-8 1}
DEVICE=${SUITE_DEVICE:-cuda}
MODEL=${SUITE_MODEL:-gpt2} # --random-config shape; served under the name gpt2 either way
# A checkpoint directory to export instead of random weights (e.g. `python -m benchmarks.trained_checkpoint`'s,
# GPT-2's shape with realistic entropy: the top-p run's nucleus is then a trained model's, not the worst case).
CHECKPOINT=${SUITE_CHECKPOINT:-}
SOURCE=(--random-config "$MODEL")
[ -n "$CHECKPOINT" ] && SOURCE=(--model "$CHECKPOINT")
STREAMS=${SUITE_STREAMS:-512}
STREAM_REQUESTS=${SUITE_STREAM_REQUESTS:-6} # per user in the many-stream runs: 2 is mostly ramp-up and tail
RUNS=${SUITE_RUNS:-single completions topp streams guidellm penalty seed} # with several gateway workers
RUNS_ONE=${SUITE_RUNS_ONE:-completions}                                   # with one gateway process
LOAD_PROCS=${SUITE_LOAD_PROCESSES:-8} # load-generator processes for the many-user runs (one could not keep up)
SKIP=" ${SUITE_SKIP:-} "
EXPORT_ARGS=${SUITE_EXPORT_ARGS:-}
TRITON_ARGS=${SUITE_TRITON_ARGS:-}
GW_PORT=8080
if [ "$DEVICE" = cuda ]; then
  DTYPE=fp16 STRICT=(--strict-device) TEST_STRICT=1
else
  DTYPE=fp32 STRICT=() TEST_STRICT=0
fi
mkdir -p "$R"/env "$R"/engine "$R"/hf "$R"/tests
exec > >(tee -a "$R/suite.log") 2>&1
. benchmarks/gpu_env.sh
PY=${SUITE_PY:-$PY}
T0=$SECONDS
STAGES="$R/stages.tsv"
printf 'stage\tstatus\trc\tseconds\tlimit_s\n' > "$STAGES"
TRITON=""
GW=""
SETSID=$(command -v setsid) # own process group per server; without it, stop_group signals the pid alone

note() { echo "=== $(date -u +%H:%M:%S) +$((SECONDS - T0))s $*"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGES"; }
left_s() { echo $((BUDGET_S - (SECONDS - T0) - RESERVE_S)); }
run_wanted() { [[ " $W_RUNS " == *" $1 "* ]]; } # in this gateway's runs (set per worker count below)
wanted() { [[ "$SKIP" != *" $1 "* ]] || { record "$1" "skipped (SUITE_SKIP)" - 0 -; return 1; }; }

# run_stage NAME LIMIT_S LOG CMD...: CMD under `timeout` (its limit capped by the budget), output to
# LOG with the last lines echoed; records ok / failed / timeout / skipped. Returns CMD's status.
run_stage() {
  local name=$1 limit=$2 log=$3 left t rc status
  shift 3
  left=$(left_s)
  if ((left < 15)); then
    note "[$name] skipped: suite budget spent"
    record "$name" skipped - 0 "$limit"
    return 125
  fi
  ((limit > left)) && limit=$left
  note "[$name] limit ${limit}s -> ${log#"$R"/}"
  t=$SECONDS
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  { grep -m 8 '^|' "$log" || tail -n 5 "$log"; } | cut -c1-240 # the report's table, else the log's end
  note "[$name] $status (rc $rc) in $((SECONDS - t))s"
  record "$name" "$status" "$rc" $((SECONDS - t)) "$limit"
  return $rc
}

# Servers run in their own process group (setsid), so stopping one also stops what it started
# (tritonserver; the gateway's worker and engine-core processes).
stop_group() { # stop_group PID: SIGINT to the group, SIGKILL after 15 s
  [ -n "$1" ] || return 0
  kill -INT -- "-$1" 2> /dev/null || kill -INT "$1" 2> /dev/null
  for _ in $(seq 30); do kill -0 "$1" 2> /dev/null || break; sleep 0.5; done
  kill -KILL -- "-$1" 2> /dev/null
  wait "$1" 2> /dev/null
  return 0
}
cleanup() {
  stop_group "$GW"
  stop_group "$TRITON"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------ 0. environment
note "results in $R (budget ${BUDGET_S}s, $DEVICE, ${CHECKPOINT:-$MODEL}, $DTYPE)"
[ -n "$CHECKPOINT" ] && cp "$CHECKPOINT"/training.md "$R"/ 2> /dev/null
{
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
} > "$R/env/nvidia-smi.txt" 2>&1
{ git rev-parse HEAD && git status --short && git diff --stat; } > "$R/env/git.txt" 2>&1
$PY - > "$R/env/versions.json" 2> "$R/env/versions.err" << 'EOF'
import json, subprocess
from datetime import UTC, datetime
from importlib import metadata

names = ["torch", "onnxruntime-gpu", "onnxruntime", "tritonclient", "nvidia-pytriton", "transformers", "numpy",
         "fastapi", "uvicorn", "pydantic", "httpx", "triton", "pytest"]
versions = {}
for n in names:
    try:
        versions[n] = metadata.version(n)
    except metadata.PackageNotFoundError:
        pass
try:
    import onnxruntime as ort
    versions["onnxruntime providers"] = ", ".join(ort.get_available_providers())
except Exception as err:
    versions["onnxruntime providers"] = f"import failed: {err}"

def out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None

print(json.dumps({"gpu": out(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]),
                  "git_commit": out(["git", "rev-parse", "--short", "HEAD"]),
                  "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "versions": versions}, indent=1))
EOF
cat "$R/env/versions.json"
record environment ok 0 $((SECONDS - T0)) -

# ------------------------------------------------------------------------------ 1. export || 2. correctness
TEST_ENV=(env "GPT2_TEST_DTYPE=$DTYPE" "GPT2_TEST_DEVICE=$DEVICE" "GPT2_TEST_STRICT=$TEST_STRICT")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestConfigWarning)
BG1="" BG2="" BG3=""
test_wanted() { [[ " ${SUITE_TESTS:-triton_model gateway_seeded instances} " == *" $1 "* ]]; }
if wanted tests; then
  test_wanted triton_model && run_stage tests_triton_model 150 "$R/tests/triton_model.log" "${TEST_ENV[@]}" "${PYTEST[@]}" \
    tests/integration/test_triton_model.py tests/unit/test_kernels.py tests/unit/test_batch_invariance.py tests/unit/test_device_draw.py \
    tests/unit/test_ahead.py tests/unit/test_scheduler_ahead.py tests/integration/test_ahead_triton.py \
    --junitxml "$R/tests/triton_model.xml" &
  BG1=$!
  test_wanted gateway_seeded && run_stage tests_gateway_seeded 150 "$R/tests/gateway_seeded.log" "${TEST_ENV[@]}" "${PYTEST[@]}" \
    tests/integration/test_gateway.py -k "seeded or two_gateways or penalt" --junitxml "$R/tests/gateway_seeded.xml" &
  BG2=$!
  # Issue 18 on one GPU: two instances of the test model (placement, stickiness, a crashed stub's
  # streams finishing on the other) and the gateway's lanes over KV partitions.
  test_wanted instances && run_stage tests_instances 150 "$R/tests/instances.log" "${TEST_ENV[@]}" "${PYTEST[@]}" \
    tests/integration/test_instances.py tests/integration/test_lanes.py --junitxml "$R/tests/instances.xml" &
  BG3=$!
fi

# An export copies the serving code into its version directory: one this suite made from other code
# (its stamp differs) is redone; one made by someone else (no stamp) is kept, as asked, with a warning.
stamp() {
  {
    find export step_model -name '*.py' 2> /dev/null | sort | xargs cat 2> /dev/null
    echo "${SOURCE[*]} $DTYPE $DEVICE ${STRICT[*]} 640 64 $EXPORT_ARGS"
  } | sha1sum | cut -c1-16
}
STAMP=$(stamp)
OLD_STAMP=$(cat "$REPO/.suite_stamp" 2> /dev/null)
if [ -f "$REPO/gpt2/1/model.onnx" ] && [ "${SUITE_FRESH_EXPORT:-0}" != 1 ] &&
  { [ "$OLD_STAMP" = "$STAMP" ] || [ -z "$OLD_STAMP" ]; }; then
  [ -z "$OLD_STAMP" ] && note "[export] WARNING: $REPO was not exported by this suite (it may carry older serving code)"
  note "[export] $REPO/gpt2/1 exists: kept"
  record export kept 0 0 -
else
  case "$REPO" in /tmp/?* | /root/?* | ./?* | /work/?*) rm -rf "$REPO" ;; esac
  run_stage export 240 "$R/export.log" "$PY" -m export "${SOURCE[@]}" --dtype "$DTYPE" --device "$DEVICE" \
    "${STRICT[@]}" --kv-capacity 640 --kv-partitions 2 --default-window 64 --repository "$REPO" --name gpt2 $EXPORT_ARGS &&
    echo "$STAMP" > "$REPO/.suite_stamp"
fi
VDIR=$(ls -d "$REPO"/gpt2/[0-9]* 2> /dev/null | awk -F/ '{print $NF, $0}' | sort -n | tail -n 1 | cut -d' ' -f2-)
cp "$REPO/gpt2/config.pbtxt" "$R/config.pbtxt" 2> /dev/null
[ -n "$VDIR" ] && cp "$VDIR/metadata.json" "$R/metadata_${MODEL}_$DTYPE.json" 2> /dev/null
note "waiting for the correctness suites"
[ -n "$BG1$BG2$BG3" ] && wait $BG1 $BG2 $BG3 # never a bare `wait`: it would wait for the tee above
grep -hE "[0-9]+ (passed|failed|error)" "$R"/tests/*.log 2> /dev/null | tail -n 4

# ------------------------------------------------------------------------------ 3. the step engine alone
ENGINE=("$PY" -m benchmarks.engine_bench "$VDIR" --capacity 640 --device "$DEVICE" "${STRICT[@]}" --out "$R/engine"
  --engine-kw cuda_graphs=true --engine-kw graph_window=64) # as served (config.pbtxt: cuda_graphs 1, window 64)
if ! wanted engine; then
  :
elif [ -n "$VDIR" ]; then
  run_stage engine 150 "$R/engine/engine_bench.log" "${ENGINE[@]}" --rows "1,64,192,$STREAMS" --profile "1,$STREAMS" \
    --prefill-rows 1,2,4,8
  # The engine's cost of the device draw: every decode row asks for it, with the seed's top-p.
  run_stage engine_draw 90 "$R/engine/engine_bench-draw.log" "${ENGINE[@]}" --rows "1,$STREAMS" \
    --draw "top_p=0.9" --tag draw
  # Decodes run ahead (step_model/ahead.py): 1 + A tokens per row per step, fed the model's own proposals,
  # with the load's top-k 50 / top-p 0.95 cuts (the proposal from the window) and the seed's top-p 0.9
  # (drawn from the whole row); tok/s counts every decoded token.
  run_stage engine_ahead 90 "$R/engine/engine_bench-ahead.log" "${ENGINE[@]}" --rows "1,$STREAMS" \
    --draw "top_p=0.95,top_k=50" --ahead "${SUITE_AHEAD:-3}" --tag ahead
  run_stage engine_ahead_topp 90 "$R/engine/engine_bench-ahead-topp.log" "${ENGINE[@]}" --rows "1,$STREAMS" \
    --draw "top_p=0.9" --ahead "${SUITE_AHEAD:-3}" --tag ahead-topp
  # Batch invariance's cost (issue 15): 16 sequences flagged, decoded in a reserved range of 64 slots
  # in a run of their own (docs/architecture.md); compare with the engine stage's rows.
  run_stage engine_invariant 120 "$R/engine/engine_bench-invariant.log" "${ENGINE[@]}" --rows "64,$STREAMS" \
    --engine-kw invariant_slots=64 --invariant-rows 16 --tag invariant
  # The tail's kernels and the draw methods alone (report only: benchmarks/tail_bench.py).
  run_stage tail 60 "$R/engine/tail_bench.log" "$PY" -m benchmarks.tail_bench --rows "1,64,192,$STREAMS"
else
  note "no exported model in $REPO: the engine and stack stages cannot run"
  record engine skipped - 0 -
fi

# ------------------------------------------------------------------------------ 4. transformers, same card
# Before the stack: bounded, and the reference the throughput and single-stream targets are ratios of.
HF=(--random-config "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --batch-sizes "1,$STREAMS" --prompt-tokens 32
  --new-tokens 128 --top-k 50 --temperature 0.8 --out "$R/hf")
if wanted hf; then
  run_stage hf_static 120 "$R/hf/static.log" "$PY" -m benchmarks.hf_static "${HF[@]}" --warmup 2 --repeats 3 --tag static
fi

# ------------------------------------------------------------------------------ 5. the whole stack
# Rows per execution = delta(nv_inference_count) / delta(nv_inference_exec_count) over a run. Triton's
# metrics guide: Inference Count is the "number of inferences performed (one request counts as 'batch
# size' inferences)", Execution Count the "number of inference executions", and for models that batch
# "average batch size = Inference Count / Execution Count". The step model's batch dimension is the row
# (one per sequence; max_batch_size 1024, dynamic batcher), so the quotient is rows per `execute`: rows
# callers sent (decode, prefill, full-row fetch and release rows alike), successful requests only, not
# the engine's bystander rows. benchmarks/gpu_summary computes it from the scrapes below, next to the model's
# own gpt2_rows_total / gpt2_steps_total.
scrape() { # scrape DIR TAG WHEN
  mkdir -p "$1/metrics"
  curl -s -m 5 localhost:8002/metrics | grep -E '^(nv_inference_|nv_gpu_utilization|nv_gpu_memory_used|gpt2_)' \
    > "$1/metrics/$2_$3_triton.txt"
  curl -s -m 5 "localhost:$GW_PORT/metrics" | grep -E '^gateway_' | grep -v '_bucket' > "$1/metrics/$2_$3_gateway.txt"
}
load_run() { # load_run DIR TAG LIMIT ARGS...
  local d=$1 tag=$2 limit=$3
  shift 3
  scrape "$d" "$tag" before
  run_stage "w${W}_$tag" "$limit" "$d/load_$tag.log" "$PY" -m benchmarks.load --base-url "http://127.0.0.1:$GW_PORT" \
    --out "$d" --tag "$tag" "$@"
  scrape "$d" "$tag" after
}
# profile_bg DIR: after a few seconds of load, 8 s of py-spy samples (folded stacks) of the process
# that runs the step loop (the engine core with several workers, else the gateway) and of Triton's
# Python-backend stub (the step model). Skipped when py-spy is not installed.
find_pyspy() { # pip --target skips bin/ when /root/site/bin exists: take the binary from the staged wheel
  command -v py-spy && return 0
  [ -x /root/site/bin/py-spy ] && { echo /root/site/bin/py-spy; return 0; }
  local whl
  whl=$(ls /root/stage/py_spy-*.whl 2> /dev/null | head -1) || return 1
  [ -n "$whl" ] || return 1
  mkdir -p /root/pyspy && (cd /root/pyspy && "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [m for m in z.namelist() if m.endswith('/scripts/py-spy')][0]; open('py-spy', 'wb').write(z.read(n))" "$whl") &&
    chmod +x /root/pyspy/py-spy && echo /root/pyspy/py-spy
}
profile_bg() {
  local spy
  spy=$(find_pyspy) || return 0
  sleep 6
  local loop
  loop=$(pgrep -f "from multiprocessing.spawn" | head -1)
  [ -n "$loop" ] || loop=$(pgrep -f "python.* -m frontend" | head -1)
  local stub
  stub=$(pgrep -f triton_python_backend_stub | head -1)
  local pids=()
  if [ -n "$loop" ]; then
    timeout 20 "$spy" record --nonblocking -r 250 -d 8 --idle --format raw -o "$1/pyspy_step_loop.txt" -p "$loop" > /dev/null 2>&1 &
    pids+=($!)
  fi
  local worker
  worker=$(pgrep -f "from multiprocessing.spawn" | sed -n 2p) # with several workers: one HTTP worker
  if [ -n "$worker" ]; then
    timeout 20 "$spy" record --nonblocking -r 250 -d 8 --idle --format raw -o "$1/pyspy_http_worker.txt" -p "$worker" > /dev/null 2>&1 &
    pids+=($!)
  fi
  if [ -n "$stub" ]; then
    timeout 20 "$spy" record --nonblocking -r 250 -d 8 --idle --format raw -o "$1/pyspy_triton_stub.txt" -p "$stub" > /dev/null 2>&1 &
    pids+=($!)
  fi
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
}
wait_ready() { # wait_ready URL PID SECONDS
  for _ in $(seq "$3"); do
    curl -sf -m 2 "$1" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 1
  done
  return 1
}
# outside_run DIR LIMIT: guidellm (benchmarks.outside_client) with the load of the 512-stream
# /v1/completions run, counters scraped around it; skipped (and recorded) when guidellm is not importable.
outside_run() {
  local d=$1 limit=$2 path=${SUITE_OUTSIDE_PATH:-}
  if ! PYTHONPATH="${path:+$path:}${PYTHONPATH:-}" "$PY" -c \
    'import importlib.util, sys; sys.exit(importlib.util.find_spec("guidellm") is None)' 2> /dev/null; then
    note "[w${W}_guidellm] skipped: guidellm is not importable (stage its wheels: docs/benchmarks.md)"
    record "w${W}_guidellm" "skipped (guidellm not importable)" - 0 -
    return 0
  fi
  ((limit > $(left_s))) && limit=$(left_s)
  scrape "$d" guidellm before
  PYTHONPATH="${path:+$path:}${PYTHONPATH:-}" run_stage "w${W}_guidellm" "$limit" "$d/guidellm.log" "$PY" \
    -m benchmarks.outside_client --base-url "http://127.0.0.1:$GW_PORT" --streams "$STREAMS" \
    --requests-per-stream "$STREAM_REQUESTS" --prompt-tokens 32 --new-tokens 128 --tokenizer "$VDIR/tokenizer" \
    --max-seconds $((limit > 60 ? limit - 30 : 30)) ${SUITE_OUTSIDE_PROCESSES:+--processes "$SUITE_OUTSIDE_PROCESSES"} \
    --out "$d"
  scrape "$d" guidellm after
}
# fits_before_one LIMIT: a report-only run of the many-worker gateway goes only when the budget still holds
# it and the 1-process run of target 5 after it (ONE_RESERVE_S: its gateway's start and its run).
ONE_RESERVE_S=${SUITE_ONE_RESERVE_S:-130}
fits_before_one() {
  local need=$1
  [[ " $WORKER_COUNTS " == *" 1 "* ]] && ((W != 1)) && ! ((ONE_DONE)) && need=$((need + ONE_RESERVE_S))
  (($(left_s) >= need)) && return 0
  note "[w${W}] report-only run left out: ${need}s needed, $(left_s)s left"
  return 1
}
# stack_runs DIR: the runs of one gateway (W workers), in the order of their weight for issue 16.
stack_runs() {
  local d=$1
  local many=(--concurrency "$STREAMS" --requests "$STREAM_REQUESTS" --max-new-tokens 128 "${PROMPTS[@]}"
    --warmup 2 --timeout-s 50 --processes "$LOAD_PROCS")
  local topk=(--temperature 0.8 --top-k 50 --top-p 0.95) # as transformers' reference and guidellm's load
  # Target 3: one stream, /v1/completions SSE (TTFT and ITL p50).
  run_wanted single && load_run "$d" single 60 --endpoint completions --ignore-eos --concurrency 1 --requests 12 \
    --max-new-tokens 128 "${PROMPTS[@]}" "${topk[@]}" --warmup 2 --timeout-s 25
  # Targets 1, 5, 6: 512 streams on /v1/completions SSE, top-k 50, 6 requests each (steady state).
  run_wanted completions && load_run "$d" completions 120 --endpoint completions --ignore-eos "${many[@]}" "${topk[@]}"
  # Target 2: the seed's default request on the same route and load; the step model draws its rows on
  # the device (gpt2_drawn_rows_total), the gateway fetches full rows only where it must.
  run_wanted topp && load_run "$d" topp 120 --endpoint completions --ignore-eos "${many[@]}" \
    --temperature 0.7 --top-p 0.9 --top-k 0
  # Target 1 on /generate, with py-spy samples of where the host time goes (when staged).
  if run_wanted streams; then
    profile_bg "$d" &
    local spy=$!
    load_run "$d" streams 120 --endpoint generate "${many[@]}" "${topk[@]}"
    wait "$spy" # only the profiler: a bare `wait` would also wait for the servers (it hung the 2026-11-30 run)
  fi
  # Target 6: guidellm with the load of the completions run.
  run_wanted guidellm && outside_run "$d" 110
  # Report only: every step names each row's seen ids to Triton (EXTRA_IDS) and samples the adjusted window.
  run_wanted penalty && fits_before_one 120 && load_run "$d" penalty 120 --endpoint generate "${many[@]}" \
    "${topk[@]}" --presence-penalty 0.5 --frequency-penalty 0.5 --repetition-penalty 1.1
  # Report only: the seed scenarios one by one (a timeout loses one, not all three), counters around all three.
  if run_wanted seed && fits_before_one 80; then
    scrape "$d" seed before
    for SC in light medium heavy; do
      run_stage "w${W}_seed_$SC" 45 "$d/load_seed_$SC.log" "$PY" -m benchmarks.load --out "$d" --tag seed \
        --base-url "http://127.0.0.1:$GW_PORT" --scenario "$SC" --endpoint generate --temperature 0.8 --top-k 50 \
        --timeout-s 30 --processes "$LOAD_PROCS"
    done
    scrape "$d" seed after
  fi
}
ONE_DONE=0
if ! wanted stack; then
  :
elif [ -n "$VDIR" ] && (($(left_s) >= 60)); then
  note "[stack] starting Triton on $REPO"
  t=$SECONDS
  $SETSID "$PY" -m embedded_triton --repository "$REPO" $TRITON_ARGS > "$R/triton.log" 2>&1 &
  TRITON=$!
  if wait_ready localhost:8000/v2/health/ready "$TRITON" 150; then
    record triton_start ok 0 $((SECONDS - t)) 150
    PROMPTS=(--prompt-tokens 32 --tokenizer "$VDIR/tokenizer")
    for W in $WORKER_COUNTS; do
      D="$R/stack_w$W"
      W_RUNS=$RUNS
      ((W == 1)) && W_RUNS=$RUNS_ONE
      if (($(left_s) < 40)); then
        note "[stack w$W] skipped: suite budget spent"
        record "gateway_w$W" skipped - 0 -
        continue
      fi
      mkdir -p "$D"
      t=$SECONDS
      WORKERS_ARG=(--workers "$W")
      ((W == 1)) && WORKERS_ARG=() # one process: the gateway as `python -m frontend` runs it by default
      # GATEWAY_IP_RPM=0: auth is off here, and the per-IP limit for anonymous traffic (600/min) would
      # refuse most of one load client's requests (the 2026-12-01 profile run: 43% were 429s).
      GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY="$REPO" GATEWAY_MAX_RUNNING=640 GATEWAY_HOST=127.0.0.1 GATEWAY_IP_RPM=0 \
        $SETSID "$PY" -m frontend --port "$GW_PORT" "${WORKERS_ARG[@]}" > "$D/gateway.log" 2>&1 &
      GW=$!
      if wait_ready "localhost:$GW_PORT/health/ready" "$GW" 120; then
        record "gateway_w$W" ok 0 $((SECONDS - t)) 120
        stack_runs "$D"
      else
        tail -n 20 "$D/gateway.log"
        record "gateway_w$W" failed 1 $((SECONDS - t)) 120
      fi
      ((W == 1)) && ONE_DONE=1
      stop_group "$GW"
      GW=""
      for _ in $(seq 20); do curl -s -m 1 "localhost:$GW_PORT" > /dev/null || break; sleep 0.5; done
    done
  else
    tail -n 30 "$R/triton.log"
    record triton_start failed 1 $((SECONDS - t)) 150
  fi
  stop_group "$TRITON"
  TRITON=""
else
  record stack skipped - 0 -
fi

# ------------------------------------------------------------------------------ 6. transformers plain generate
# A reference only (issue 16's table names it): when the budget still has room for it.
if [[ "$SKIP" == *" hf "* || "$SKIP" == *" hf_plain "* ]]; then
  record hf_plain "skipped (SUITE_SKIP)" - 0 -
elif (($(left_s) >= 50)); then
  run_stage hf_plain 90 "$R/hf/plain.log" "$PY" -m benchmarks.baseline "${HF[@]}" --tag plain
else
  record hf_plain "skipped (budget)" - 0 -
fi

# ------------------------------------------------------------------------------ 7. summary and archive
note "summary"
timeout 60 "$PY" -m benchmarks.gpu_summary "$R" --streams "$STREAMS" > "$R/gpu_summary.log" 2>&1 ||
  tail -n 20 "$R/gpu_summary.log"
note "done in $((SECONDS - T0))s"
tar -czf "$OUT/gpu_suite.tgz" -C "$R" .
echo
cat "$R/summary.md" 2> /dev/null || echo "summary.md missing: see $R/gpu_summary.log"
