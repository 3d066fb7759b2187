#!/usr/bin/env bash
# Start the Docker daemon in the background unless one already answers; wait until it does.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "the Docker daemon is not running; start it (sudo systemctl start docker) and retry" >&2
  exit 1
fi
log=/var/log/qtbuild-dockerd.log
setsid nohup dockerd >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "dockerd did not start within 60 s; its log:" >&2
tail -n 40 "$log" >&2
exit 1
