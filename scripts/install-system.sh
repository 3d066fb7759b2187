#!/usr/bin/env bash
# System packages qtbuild's tests and benchmarks use (Debian/Ubuntu, as root or with sudo):
#   docker.io        the Docker engine (image source `docker://`)
#   docker-registry  a real OCI distribution registry, started by tests on 127.0.0.1
#   skopeo           produces OCI layouts, OCI archives and registry pushes independently of qtbuild
#   podman           its Docker-compatible API socket as a docker:// source (tests/e2e/test_podman.py;
#                    only `load` and the image API are used: vfs storage, no container is run)
#   softhsm2         a PKCS#11 token for the signing-key tests (--private-key pkcs11:…)
#   busybox-static   a static userland for test images built FROM scratch
#   cpio, umoci, zstd  independent references for ramdisks, unpacking and zstd layers
#   debootstrap      builds a Debian base image locally (Docker Hub is unreachable here)
#   openssl, python3-venv  signing keys in the quickstart; the virtualenv qtbuild installs into
#   gcc, libc6-dev, iproute2  static test helpers for the sandbox tests (AF_VSOCK probe), ip(8)
#   jq               docs/first-enclave-app.md's shell steps (run by tests/e2e/test_walkthrough.py)
set -euo pipefail
packages=(docker.io docker-registry skopeo podman softhsm2 busybox-static cpio umoci zstd debootstrap openssl python3-venv gcc libc6-dev iproute2 jq)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
