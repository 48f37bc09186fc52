#!/usr/bin/env bash
# Makes sure a Docker engine answers, for `make compose-up` and the compose test tier (.ci/run):
# when `docker info` fails, installs Debian's docker.io if dockerd is missing and starts dockerd
# in the background, the way this project's machines run it: no bridge, no iptables, host
# networking only (docker-compose.yml uses `network_mode: host`). Its log: build/dockerd.log.
# An engine that already runs (Docker Desktop, a system service) is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker info >/dev/null 2>&1; then exit 0; fi
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
apt_install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}
if ! command -v dockerd >/dev/null 2>&1; then
  echo "installing docker.io (Debian package) for the Docker engine"
  apt_install docker.io
fi
mkdir -p build
echo "starting dockerd (no bridge, host networking; log: build/dockerd.log)"
$SUDO sh -c 'nohup dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
  >build/dockerd.log 2>&1 </dev/null & echo $! >build/dockerd.pid'
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then echo "dockerd ready (pid $(cat build/dockerd.pid))"; exit 0; fi
  sleep 1
done
echo "dockerd did not answer within 60 s; its log:" >&2
tail -20 build/dockerd.log >&2
exit 1
