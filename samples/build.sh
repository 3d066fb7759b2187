#!/usr/bin/env bash
# Build a sample image with the local Docker daemon: samples/build.sh NAME [TAG]
# (SAMPLE_EDIT=FILE appends one byte to FILE in the build context: a deliberately different image)
# The build context gets a copy of the static busybox (Debian's busybox-static) so samples can be
# FROM scratch: Docker Hub is not needed.  Samples that COPY qtbuild_sdk get the enclave SDK
# exported into the context by qtbuild ($QTBUILD, else `qtbuild` on PATH, else ../.venv/bin/qtbuild).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${1:?usage: build.sh NAME [TAG]}
tag=${2:-latest}
dir="$here/$name"
[ -f "$dir/Dockerfile" ] || { echo "no sample named $name ($here/*/Dockerfile)" >&2; exit 2; }
busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "busybox not found: apt-get install busybox-static" >&2; exit 2; }
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp -r "$dir"/. "$context"/
cp "$busybox" "$context/busybox"
if [ -n "${SAMPLE_EDIT:-}" ]; then
  # the demo's "one changed byte" rebuild: append one byte to this file of the build context
  printf '#' >> "$context/$SAMPLE_EDIT"
fi
if grep -q qtbuild_sdk "$dir/Dockerfile"; then
  # the enclave SDK, exported as a self-contained package (qtbuild sdk export)
  qtbuild=${QTBUILD:-$(command -v qtbuild || echo "$here/../.venv/bin/qtbuild")}
  $qtbuild sdk export "$context" >/dev/null
fi
if grep -q 'ARG BASE=debian:bookworm-slim' "$dir/Dockerfile" && [ -z "${BASE:-}" ]; then
  bash "$here/base-images.sh" >/dev/null   # Docker Hub is unreachable: build the base locally
fi
docker build -q ${BASE:+--build-arg "BASE=$BASE"} ${EXTRA_BUILD_ARGS:-} -t "qtbuild-samples/$name:$tag" "$context" >/dev/null
echo "qtbuild-samples/$name:$tag"
