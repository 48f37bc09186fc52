#!/bin/sh
# Starts Prometheus on /etc/prometheus/prometheus.yml with its targets' ports taken from the
# environment: GATEWAY_PORT (default 8080) and TRITON_METRICS_PORT (default 8002) replace the
# ports of the config's 127.0.0.1:8080 and 127.0.0.1:8002 targets. PROMETHEUS_PORT: its own.
set -eu
config=/tmp/prometheus.yml
sed -e "s/127\.0\.0\.1:8080/127.0.0.1:${GATEWAY_PORT:-8080}/" \
    -e "s/127\.0\.0\.1:8002/127.0.0.1:${TRITON_METRICS_PORT:-8002}/" \
    /etc/prometheus/prometheus.yml >"$config"
exec prometheus --config.file="$config" --storage.tsdb.path=/prometheus \
  --storage.tsdb.retention.time="${PROMETHEUS_RETENTION:-7d}" \
  --web.listen-address="${PROMETHEUS_ADDRESS:-0.0.0.0}:${PROMETHEUS_PORT:-9090}" "$@"
