#!/usr/bin/env bash
# Build a sample image with the local Docker daemon: scripts/build-sample.sh NAME [TAG]
# The build context gets a copy of the static busybox (Debian's busybox-static) so samples can be
# FROM scratch: Docker Hub is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: build-sample.sh NAME [TAG]}
tag=${2:-latest}
dir="samples/$name"
[ -f "$dir/Dockerfile" ] || { echo "no sample named $name (samples/*/Dockerfile)" >&2; exit 2; }
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 2; }
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp -r "$dir"/. "$context"/
cp "$busybox" "$context/busybox"
docker build -q -t "qtbuild-samples/$name:$tag" "$context" >/dev/null
echo "qtbuild-samples/$name:$tag"
