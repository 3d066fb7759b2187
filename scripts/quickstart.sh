#!/usr/bin/env bash
# One command for a new user on a fresh Debian/Ubuntu machine: install qtbuild and what it needs
# (Docker engine, registry, skopeo, busybox-static; Python package in ./.venv), then run the
# main job on the bundled samples: build the image, convert it to a signed EIF, print and verify
# its measurements, show that a rebuild reproduces them, then run the bank-card seed workflow
# (KMS, object store, attested decryption in a local enclave, and the refusals).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*" >&2; }

say "installing system packages (docker.io, docker-registry, skopeo, busybox-static, ...)"
bash scripts/install-system.sh
say "starting the Docker daemon"
bash scripts/start-dockerd.sh
say "installing qtbuild into ./.venv"
bash scripts/install.sh
qtbuild=.venv/bin/qtbuild
out=${QUICKSTART_DIR:-quickstart-output}
mkdir -p "$out"

say "building the sample image samples/hello (FROM scratch + static busybox)"
image=$(bash samples/build.sh hello)

say "creating a P-384 signing key and self-signed certificate (the QingTian recipe)"
if [ ! -f "$out/signing-key.pem" ]; then
  openssl ecparam -name secp384r1 -genkey -noout -out "$out/signing-key.pem"
  openssl req -new -x509 -sha384 -key "$out/signing-key.pem" -days 365 -subj "/CN=qtbuild quickstart" -out "$out/signing-cert.pem"
fi

say "qtbuild convert docker://$image -> $out/hello.eif (signed)"
$qtbuild convert "docker://$image" -o "$out/hello.eif" --name hello --version 1.0 \
  --private-key "$out/signing-key.pem" --signing-certificate "$out/signing-cert.pem" | tee "$out/hello.measurements.json"

say "qtbuild describe $out/hello.eif"
$qtbuild describe "$out/hello.eif" > "$out/hello.describe.json"
head -n 30 "$out/hello.describe.json"

say "qtbuild verify: structure, CRC, signature and PCRs against the recorded measurements"
$qtbuild verify "$out/hello.eif" --expect "$out/hello.measurements.json" --signing-certificate "$out/signing-cert.pem"

say "reproducibility: convert again and --check against the first image"
$qtbuild convert "docker://$image" --name hello --version 1.0 --check "$out/hello.eif" -q >/dev/null

say "creating the debian:bookworm-slim base image locally (debootstrap; only the first time)"
bash samples/base-images.sh

say "the seed workflow end to end: qtbuild demo bank-card"
$qtbuild demo bank-card

say "done: outputs are in $out/"
