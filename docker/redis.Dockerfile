# Redis for docker-compose.yml (the shared result cache; keys and quotas when configured):
# Debian 12's redis-server on gpt2-serving/base:bookworm (docker/base/build.sh), so that no
# image registry is needed. Where one is reachable, the official `redis:7` image is equivalent.
ARG BASE_IMAGE=gpt2-serving/base:bookworm
FROM ${BASE_IMAGE}
# A fixed uid/gid (999, as the official image's) so that Kubernetes' fsGroup can give the user its
# volume (deploy/kubernetes/redis.yaml); Debian's package reuses an existing `redis` user.
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"]
