#!/usr/bin/env bash
# Create the base images the samples build FROM, locally (Docker Hub is not reachable here):
#   debian:bookworm-slim  debootstrap --variant=minbase of Debian bookworm, imported with
#                         `docker import`; the samples' Dockerfiles say `ARG BASE=debian:bookworm-slim`
# Existing images are kept.  Uses the machine's Debian mirror (from /etc/apt) unless MIRROR is set.
set -euo pipefail
image=${BASE_IMAGE:-debian:bookworm-slim}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
mirror=${MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror (a few minutes) ..." >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$image" >/dev/null
echo "$image created" >&2
