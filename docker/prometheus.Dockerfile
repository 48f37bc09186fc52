# Prometheus for docker-compose.yml: Debian 12's prometheus (2.42) on gpt2-serving/base:bookworm
# (docker/base/build.sh), so that no image registry is needed. Where one is reachable,
# `prom/prometheus` is equivalent.
#
# The scrape config (docker/prometheus.yml) is mounted at /etc/prometheus/prometheus.yml. With
# host networking the gateway's and Triton's ports may move (the compose test runs the stack on
# free ports): docker/prometheus-run.sh writes the config's targets from GATEWAY_PORT and
# TRITON_METRICS_PORT before it starts Prometheus.
ARG BASE_IMAGE=gpt2-serving/base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
COPY prometheus-run.sh /usr/local/bin/prometheus-run
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
CMD ["prometheus-run"]
