#!/usr/bin/env bash
# `make compose-up` / `make compose-down`: the stack of docker-compose.yml built from this
# checkout and run on this machine.
#
#   docker/compose.sh up     engine (docker/engine.sh), base image (docker/base/build.sh), torch's
#                            CPU wheel staged in docker/wheels/, images built, stack started;
#                            returns once the gateway's /health/ready answers 200
#   docker/compose.sh down   stops and removes the stack's containers (the named volumes stay;
#                            COMPOSE_DOWN_ARGS=--volumes removes them too)
#
# Environment: GPU=1 adds docker-compose.gpu.yml; COMPOSE_PROFILES=grafana adds Grafana (pulled
# from a registry); GPT2_* variables of docker-compose.yml (ports, GPT2_MODEL_REPOSITORY,
# GPT2_MODEL); COMPOSE_PROJECT_NAME (default gpt2-serving); READY_TIMEOUT_S (default 900).
# The model repository must hold a model (make compose-up exports the default one first).
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-gpt2-serving}"
files=(-f docker-compose.yml)
if [ -n "${GPU:-}" ] && [ "${GPU}" != 0 ]; then files+=(-f docker-compose.gpu.yml); fi
if [ -z "${GPT2_ENV_FILE:-}" ] && [ -f .env ]; then export GPT2_ENV_FILE=.env; fi

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "${files[@]}" "$@"
  else docker-compose "${files[@]}" "$@"; fi
}

ensure_compose() {
  docker compose version >/dev/null 2>&1 && return
  command -v docker-compose >/dev/null 2>&1 && return
  echo "installing docker-compose (Debian package: Compose v1)"
  SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
}

stage_torch_wheel() {
  # requirements.txt's torch pin, as the CPU build the host's pip finds on local disk (its
  # find-links); nothing is downloaded. Without one, the image's pip asks its index (see
  # docker/triton.Dockerfile: TORCH_INDEX_URL).
  local pin
  pin="$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
  ls docker/wheels/torch-"${pin#torch==}"+cpu-*.whl >/dev/null 2>&1 && return
  python3 -m pip download -q --no-index --no-deps --only-binary=:all: --dest docker/wheels \
    --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 "$pin" \
    >/dev/null 2>&1 && echo "staged $(ls docker/wheels/torch-*.whl) for the Triton image" ||
    echo "no local torch wheel to stage: the Triton image's pip fetches ${pin} (TORCH_INDEX_URL)"
}

wait_ready() {
  local url="http://127.0.0.1:${GPT2_GATEWAY_PORT:-8080}/health/ready" deadline=$((SECONDS + ${READY_TIMEOUT_S:-900}))
  echo "waiting for the gateway: $url"
  until python3 -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('$url', timeout=2).status != 200)" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "the gateway was not ready after ${READY_TIMEOUT_S:-900} s" >&2
      compose ps >&2; compose logs --tail 40 triton gateway >&2
      return 1
    fi
    sleep 2
  done
  echo "gateway ready: http://127.0.0.1:${GPT2_GATEWAY_PORT:-8080} (prometheus http://127.0.0.1:${GPT2_PROMETHEUS_PORT:-9090})"
}

case "${1:-}" in
  up)
    docker/engine.sh
    ensure_compose
    base="${GPT2_BASE_IMAGE:-gpt2-serving/base:bookworm}"
    case "$base" in  # ours is built here; another (debian:bookworm-slim) is pulled by the builds
      gpt2-serving/*) docker/base/build.sh "$base" ;;
    esac
    stage_torch_wheel
    start=$SECONDS
    compose build
    echo "images built in $((SECONDS - start)) s"
    if ! compose up -d; then
      compose ps >&2; compose logs --tail 60 >&2
      exit 1
    fi
    wait_ready
    ;;
  down)
    ensure_compose
    # shellcheck disable=SC2086
    compose down --remove-orphans ${COMPOSE_DOWN_ARGS:-}
    ;;
  *)
    echo "usage: docker/compose.sh up|down" >&2
    exit 2
    ;;
esac
