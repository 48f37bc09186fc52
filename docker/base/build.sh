#!/usr/bin/env bash
# Builds gpt2-serving/base:bookworm, the image every other image of this project starts FROM,
# without an image registry: debootstrap a minimal Debian 12 (bookworm) with Debian's Python 3.11
# into a directory and `docker import` it. Debian's package mirror is the only thing it fetches.
#
#   docker/base/build.sh [--force] [TAG]
#
# Cached: when TAG is already in the Docker engine's image store it returns at once (the store
# outlives the engine's restarts, so CI on the same machine reuses it); --force rebuilds.
# Where a registry IS reachable, `--build-arg BASE_IMAGE=debian:bookworm-slim` on the other
# images skips this script (their Dockerfiles install python3 and python3-venv themselves).
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
tag="${1:-gpt2-serving/base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag: present (docker/base/build.sh --force rebuilds it)"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap (Debian package)"
  SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

root="$(mktemp -d "${TMPDIR:-/tmp}/gpt2-base.XXXXXX")"
# debootstrap mounts /proc and /sys inside the target: never delete through a mount.
trap 'for m in proc sys dev/pts; do umount "$root/$m" 2>/dev/null || true; done; rm -rf --one-file-system "$root"' EXIT
start=$(date +%s)
echo "debootstrap bookworm (minbase + python3) into $root from $mirror"
# minbase: dpkg, apt and essentials only. python3-venv: each image keeps its packages in
# /opt/venv (Debian's own python3 refuses `pip install` into the system, PEP 668).
# libpython3.11: the shared libpython that Triton's Python-backend stub links against.
debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11,ca-certificates \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
# apt in a container: no recommends, no documentation, no package lists kept in layers.
cat >"$root/etc/apt/apt.conf.d/90container" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT
cat >"$root/etc/dpkg/dpkg.cfg.d/90container" <<'DPKG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
DPKG
# Trust what the host trusts: certificates of the host's bundle that Debian's lacks (a
# TLS-inspecting proxy's CA, say) go to /usr/local/share/ca-certificates, so that apt and pip in
# the images' builds reach what the host reaches.
host_bundle="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -r "$host_bundle" ]; then
  python3 - "$host_bundle" "$root/etc/ssl/certs/ca-certificates.crt" "$root/usr/local/share/ca-certificates" <<'PY'
import re, sys
from pathlib import Path
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, image = (set(pem.findall(Path(p).read_text())) for p in sys.argv[1:3])
for i, cert in enumerate(sorted(host - image)):
    Path(sys.argv[3], f"host-{i}.crt").write_text(cert + "\n")
print(f"certificates added from the host's bundle: {len(host - image)}")
PY
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
: >"$root/etc/resolv.conf"  # the engine writes the container's own
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap bookworm minbase + python3 (docker/base/build.sh)" - "$tag" >/dev/null
echo "base image $tag: built in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
