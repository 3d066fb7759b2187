#!/usr/bin/env bash
# The release pipeline of an enclave image, as two CI jobs (copy them into your CI system).
#
#   release.sh release   SOURCE KEY.pem CERT.pem DIST   build, sign, attest, publish measurements
#   release.sh reproduce SOURCE DIST                    rebuild independently and check
#
# KEY.pem may also name a key that never touches the disk: a pkcs11: URI (an HSM) or a kms:// URI
# (a KMS's asymmetric EC key; its request-signing credentials from QTBUILD_KMS_CREDENTIALS=FILE or
# KMS_ACCESS_KEY/KMS_SECRET_KEY).
# SOURCE is any qtbuild source; in CI use the registry (registry://HOST/REPO@sha256:…, or :TAG),
# an OCI layout/archive or a docker save tarball: none needs root, apt or a Docker daemon, only
# `pip install qtbuild`.  Both jobs must see the same SOURCE_DATE_EPOCH (the release commit's
# time, e.g. `git log -1 --format=%ct`); it defaults to 0 here.
#
# DIST receives what the release job publishes:
#   app.eif                the signed enclave image
#   measurements.json      {digest, PCR0, PCR1, PCR2, PCR8} (qt's shape; pin these in KMS policies)
#   describe.json          nitro-cli describe-eif's document (Measurements in nitro-cli's shape)
#   app.intoto.json        in-toto/SLSA provenance, a DSSE envelope signed with KEY
#   signing-cert.pem       the certificate (PCR8 is its hash)
# Exit status: 0 ok, 1 a check failed (the rebuild does not reproduce), 2 bad input.
set -euo pipefail
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-0}"
QTBUILD="${QTBUILD:-qtbuild}"

release() {
  local source="$1" key="$2" cert="$3" dist="$4"
  mkdir -p "$dist"
  "$QTBUILD" convert "$source" -o "$dist/app.eif" --private-key "$key" --signing-certificate "$cert" \
    --provenance "$dist/app.intoto.json" -q > "$dist/measurements.json"
  "$QTBUILD" describe "$dist/app.eif" --format nitro > "$dist/describe.json"
  cp "$cert" "$dist/signing-cert.pem"
  # the published files must agree with each other before anything is announced
  "$QTBUILD" verify "$dist/app.eif" --expect "$dist/measurements.json" --provenance "$dist/app.intoto.json" \
    --signing-certificate "$dist/signing-cert.pem"
}

reproduce() {
  local source="$1" dist="$2"
  # what was published is consistent and signed by the published certificate ...
  "$QTBUILD" verify "$dist/app.eif" --expect "$dist/measurements.json" --provenance "$dist/app.intoto.json" \
    --signing-certificate "$dist/signing-cert.pem"
  # ... and an independent rebuild from the source gives the same PCR0/1/2 (exit 1 naming the files if not)
  "$QTBUILD" convert "$source" --check "$dist/app.eif" -q > /dev/null
}

case "${1:-}" in
  release) shift; [ $# -eq 4 ] || { echo "usage: $0 release SOURCE KEY.pem CERT.pem DIST" >&2; exit 2; }; release "$@" ;;
  reproduce) shift; [ $# -eq 2 ] || { echo "usage: $0 reproduce SOURCE DIST" >&2; exit 2; }; reproduce "$@" ;;
  *) echo "usage: $0 release SOURCE KEY.pem CERT.pem DIST | reproduce SOURCE DIST" >&2; exit 2 ;;
esac
