#!/usr/bin/env bash
# The whole GPU measurement in one device call (H200). From the project root, after the staged
# wheels are installed in /root/site (see ../shared/device/README.md):
#
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh      # results: $OUT/<UTC date>-h200/ and $OUT/gpu_suite.tgz
#
# In this order (each stage under `timeout`; a stage that fails, times out or no longer fits the
# budget is recorded in stages.tsv and the suite goes on):
#   0. environment: nvidia-smi, package versions, git commit                       -> env/
#   1. export of the GPT-2 124M shape, fp16, strict device, 640 KV slots, window 64 -> export.log
#      (kept when SUITE_REPO already holds one, see below), in parallel with
#   5. correctness: the Triton parity suite in fp16 strict device and the seeded-determinism tests of
#      the gateway suite (their own tiny models and servers, on free ports)          -> tests/
#   2. the step engine alone at 1, 64, 512 rows; kernel tables at 1 and 512        -> engine/
#   4. transformers on the same card: plain generate; static cache + compile        -> hf/
#   3. the whole stack (embedded Triton + gateway, GATEWAY_MAX_RUNNING=640) with 1 then 8 gateway
#      workers: single stream, 512 streams (/generate, then SSE), the seed scenarios, top-p 0.95, with
#      Triton's and the gateway's /metrics scraped around every run                 -> stack_w<W>/
#   6. benchmarks.gpu_summary -> summary.md (target vs measured); $OUT/gpu_suite.tgz; summary printed
#
# Wall time: a global budget (SUITE_BUDGET_S, default 480 s) caps every stage's timeout and keeps
# RESERVE_S for the summary and the archive; what no longer fits is skipped, so the later stages go
# first (the 8-worker runs, then the 1-worker ones). Estimated 6-8 minutes; at the 2026-11-30 speeds
# the budget may cut the last 8-worker runs (stages.tsv says which).
#
# Knobs: OUT (/tmp/out), SUITE_REPO (/tmp/repo), SUITE_BUDGET_S (480), SUITE_WORKERS ("1 8"),
# SUITE_TOPP_TOKENS (32), SUITE_FRESH_EXPORT=1 (export again even when SUITE_REPO has a model),
# SUITE_SKIP (stages to leave out, any of "tests engine hf stack"; skipped stages are recorded),
# SUITE_RUNS (the whole-stack runs, default "single streams sse penalty seed topp"), SUITE_STREAM_REQUESTS (2),
# SUITE_LOAD_PROCESSES (8: load-generator processes of every run but the single stream).
# For a dry run without a GPU: SUITE_DEVICE=cpu SUITE_MODEL=tiny SUITE_PY=.venv/bin/python
# SUITE_STREAMS=64 SUITE_LABEL=cpu-dry (fp32, no strict device; figures meaningless, plumbing real).
set -u -o pipefail
set +m # no job control: background jobs stay in our process group, `setsid` below execs in place
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}
R="$OUT/$(date -u +%Y-%m-%d)-${SUITE_LABEL:-h200}"
[ -e "$R" ] && R="$R-$(date -u +%H%M%S)" # never mix two runs' files
REPO=${SUITE_REPO:-/tmp/repo}
BUDGET_S=${SUITE_BUDGET_S:-480}
RESERVE_S=25 # kept for the summary and the archive
WORKER_COUNTS=${SUITE_WORKERS:-1 8}
TOPP_TOKENS=${SUITE_TOPP_TOKENS:-32}
TOPP_STREAMS=${SUITE_TOPP_STREAMS:-64} # at 512 the full-row sampling of random weights timed out (2026-11-30)
DEVICE=${SUITE_DEVICE:-cuda}
MODEL=${SUITE_MODEL:-gpt2} # --random-config shape; served under the name gpt2 either way
STREAMS=${SUITE_STREAMS:-512}
STREAM_REQUESTS=${SUITE_STREAM_REQUESTS:-2} # per user in the 512-stream run
RUNS=${SUITE_RUNS:-single streams sse penalty seed topp} # the whole-stack runs, per worker count
LOAD_PROCS=${SUITE_LOAD_PROCESSES:-8} # load-generator processes for the many-user runs (one could not keep up)
SKIP=" ${SUITE_SKIP:-} "
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
run_wanted() { [[ " $RUNS " == *" $1 "* ]]; }
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
note "results in $R (budget ${BUDGET_S}s, $DEVICE, $MODEL, $DTYPE)"
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

# ------------------------------------------------------------------------------ 1. export || 5. correctness
TEST_ENV=(env "GPT2_TEST_DTYPE=$DTYPE" "GPT2_TEST_DEVICE=$DEVICE" "GPT2_TEST_STRICT=$TEST_STRICT")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestConfigWarning)
BG1="" BG2=""
if wanted tests; then
  run_stage tests_triton_model 240 "$R/tests/triton_model.log" "${TEST_ENV[@]}" "${PYTEST[@]}" \
    tests/integration/test_triton_model.py --junitxml "$R/tests/triton_model.xml" &
  BG1=$!
  run_stage tests_gateway_seeded 240 "$R/tests/gateway_seeded.log" "${TEST_ENV[@]}" "${PYTEST[@]}" \
    tests/integration/test_gateway.py -k "seeded or two_gateways or penalt" --junitxml "$R/tests/gateway_seeded.xml" &
  BG2=$!
fi

# An export copies the serving code into its version directory: one this suite made from other code
# (its stamp differs) is redone; one made by someone else (no stamp) is kept, as asked, with a warning.
stamp() {
  {
    find export step_model -name '*.py' 2> /dev/null | sort | xargs cat 2> /dev/null
    echo "$MODEL $DTYPE $DEVICE ${STRICT[*]} 640 64"
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
  run_stage export 240 "$R/export.log" "$PY" -m export --random-config "$MODEL" --dtype "$DTYPE" --device "$DEVICE" \
    "${STRICT[@]}" --kv-capacity 640 --default-window 64 --repository "$REPO" --name gpt2 &&
    echo "$STAMP" > "$REPO/.suite_stamp"
fi
VDIR=$(ls -d "$REPO"/gpt2/[0-9]* 2> /dev/null | awk -F/ '{print $NF, $0}' | sort -n | tail -n 1 | cut -d' ' -f2-)
cp "$REPO/gpt2/config.pbtxt" "$R/config.pbtxt" 2> /dev/null
[ -n "$VDIR" ] && cp "$VDIR/metadata.json" "$R/metadata_${MODEL}_$DTYPE.json" 2> /dev/null
note "waiting for the correctness suites"
[ -n "$BG1$BG2" ] && wait $BG1 $BG2 # never a bare `wait`: it would wait for the tee above
grep -hE "[0-9]+ (passed|failed|error)" "$R"/tests/*.log 2> /dev/null | tail -n 4

# ------------------------------------------------------------------------------ 2. the step engine alone
if ! wanted engine; then
  :
elif [ -n "$VDIR" ]; then
  run_stage engine 150 "$R/engine/engine_bench.log" "$PY" -m benchmarks.engine_bench "$VDIR" --rows "1,64,$STREAMS" \
    --profile "1,$STREAMS" --capacity 640 --device "$DEVICE" "${STRICT[@]}" --out "$R/engine" \
    --engine-kw cuda_graphs=true --engine-kw graph_window=64 # as served (config.pbtxt: cuda_graphs 1, window 64)
else
  note "no exported model in $REPO: the engine and stack stages cannot run"
  record engine skipped - 0 -
fi

# ------------------------------------------------------------------------------ 4. transformers, same card
# Before the stack: bounded, and the reference every stack figure is compared with.
HF=(--random-config "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --batch-sizes "1,32,$STREAMS" --prompt-tokens 32
  --new-tokens 128 --top-k 50 --temperature 0.8 --out "$R/hf")
if wanted hf; then
  run_stage hf_plain 120 "$R/hf/plain.log" "$PY" -m benchmarks.baseline "${HF[@]}" --tag plain
  run_stage hf_static 120 "$R/hf/static.log" "$PY" -m benchmarks.hf_static "${HF[@]}" --warmup 2 --repeats 3 --tag static
fi

# ------------------------------------------------------------------------------ 3. the whole stack
# Rows per execution = delta(nv_inference_count) / delta(nv_inference_exec_count) over a run. Triton's
# metrics guide: Inference Count is the "number of inferences performed (one request counts as 'batch
# size' inferences)", Execution Count the "number of inference executions", and for models that batch
# "average batch size = Inference Count / Execution Count". The step model's batch dimension is the row
# (one per sequence; max_batch_size 1024, dynamic batcher), so the quotient is rows per `execute`: rows
# callers sent (decode, prefill, full-row fetch and release rows alike), successful requests only, not
# the engine's bystander rows. gpu_summary.py computes it from the scrapes below, next to the model's
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
if ! wanted stack; then
  :
elif [ -n "$VDIR" ] && (($(left_s) >= 60)); then
  note "[stack] starting Triton on $REPO"
  t=$SECONDS
  $SETSID "$PY" -m embedded_triton --repository "$REPO" > "$R/triton.log" 2>&1 &
  TRITON=$!
  if wait_ready localhost:8000/v2/health/ready "$TRITON" 150; then
    record triton_start ok 0 $((SECONDS - t)) 150
    PROMPTS=(--prompt-tokens 32 --tokenizer "$VDIR/tokenizer" --temperature 0.8)
    for W in $WORKER_COUNTS; do
      D="$R/stack_w$W"
      if (($(left_s) < 40)); then
        note "[stack w$W] skipped: suite budget spent"
        record "gateway_w$W" skipped - 0 -
        continue
      fi
      mkdir -p "$D"
      t=$SECONDS
      # GATEWAY_IP_RPM=0: auth is off here, and the per-IP limit for anonymous traffic (600/min) would
      # refuse most of one load client's requests (the 2026-12-01 profile run: 43% were 429s).
      GATEWAY_MODEL=gpt2 GATEWAY_REPOSITORY="$REPO" GATEWAY_MAX_RUNNING=640 GATEWAY_HOST=127.0.0.1 GATEWAY_IP_RPM=0 \
        $SETSID "$PY" -m frontend --port "$GW_PORT" --workers "$W" > "$D/gateway.log" 2>&1 &
      GW=$!
      if wait_ready "localhost:$GW_PORT/health/ready" "$GW" 120; then
        record "gateway_w$W" ok 0 $((SECONDS - t)) 120
        # The top-k 50 runs keep load.py's default top-p 0.95, as the 2026-11-30 runs and hf_* do.
        run_wanted single && load_run "$D" single 60 --endpoint stream --concurrency 1 --requests 12 --max-new-tokens 128 "${PROMPTS[@]}" \
          --top-k 50 --warmup 2 --timeout-s 25
        run_wanted streams && {
        profile_bg "$D" & # where the host time goes during the 512-stream run (py-spy, when staged)
        SPY=$!
        load_run "$D" streams 120 --endpoint generate --concurrency "$STREAMS" --requests "$STREAM_REQUESTS" \
          --max-new-tokens 128 "${PROMPTS[@]}" --top-k 50 --warmup 2 --timeout-s 50 --processes "$LOAD_PROCS"
        wait "$SPY" # only the profiler: a bare `wait` would also wait for the servers (it hung the 2026-11-30 run)
        }
        # The same load streamed: one SSE event per token to each of the 512 clients.
        run_wanted sse && load_run "$D" sse 120 --endpoint stream --concurrency "$STREAMS" --requests "$STREAM_REQUESTS" \
          --max-new-tokens 128 "${PROMPTS[@]}" --top-k 50 --warmup 2 --timeout-s 50 --processes "$LOAD_PROCS"
        # The 512-stream /generate run with presence, frequency and repetition penalties: every step
        # names each row's seen ids to Triton (EXTRA_IDS) and samples the adjusted window (report only).
        run_wanted penalty && load_run "$D" penalty 120 --endpoint generate --concurrency "$STREAMS" \
          --requests "$STREAM_REQUESTS" --max-new-tokens 128 "${PROMPTS[@]}" --top-k 50 --presence-penalty 0.5 \
          --frequency-penalty 0.5 --repetition-penalty 1.1 --warmup 2 --timeout-s 50 --processes "$LOAD_PROCS"
        # The seed scenarios one by one (a timeout loses one, not all three), counters around all three.
        run_wanted seed && scrape "$D" seed before
        run_wanted seed && for SC in light medium heavy; do
          run_stage "w${W}_seed_$SC" 45 "$D/load_seed_$SC.log" "$PY" -m benchmarks.load --out "$D" --tag seed \
            --base-url "http://127.0.0.1:$GW_PORT" --scenario "$SC" --endpoint generate --temperature 0.8 --top-k 50 \
            --timeout-s 30 --processes "$LOAD_PROCS"
        done
        run_wanted seed && scrape "$D" seed after
        # Report only. Top-p over random weights needs every full row on the host (a few ms of sampling
        # per row per step in the gateway), so this run generates $TOPP_TOKENS tokens per stream, not 128.
        run_wanted topp && load_run "$D" topp 90 --endpoint generate --concurrency "$TOPP_STREAMS" --requests 1 \
          --max-new-tokens "$TOPP_TOKENS" "${PROMPTS[@]}" --top-k 0 --top-p 0.95 --warmup 1 --timeout-s 70 \
          --processes "$LOAD_PROCS"
      else
        tail -n 20 "$D/gateway.log"
        record "gateway_w$W" failed 1 $((SECONDS - t)) 120
      fi
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

# ------------------------------------------------------------------------------ 6. summary and archive
note "summary"
timeout 60 "$PY" -m benchmarks.gpu_summary "$R" --streams "$STREAMS" > "$R/gpu_summary.log" 2>&1 ||
  tail -n 20 "$R/gpu_summary.log"
note "done in $((SECONDS - T0))s"
tar -czf "$OUT/gpu_suite.tgz" -C "$R" .
echo
cat "$R/summary.md" 2> /dev/null || echo "summary.md missing: see $R/gpu_summary.log"
