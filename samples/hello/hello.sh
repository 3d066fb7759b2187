#!/bin/busybox sh
# Runs inside the enclave: no network, no host files; output goes to the debug console.
count=0
while true; do
  echo "hello enclave!"
  count=$((count + 1))
  if [ -n "${HELLO_COUNT:-}" ] && [ "$count" -ge "$HELLO_COUNT" ]; then
    exit 0
  fi
  /bin/busybox sleep 2
done
