#!/usr/bin/env bash
# Long-run coverage-guided fuzzing (atheris) of every parser, outside CI:
#
#     bash scripts/fuzz.sh --minutes 10 [TARGET...]
#
# The minutes are shared equally by the targets (all of tests/helpers/fuzz_targets.py by
# default), fuzzed one after another.  Prints inputs and inputs/s per target.  Every input that
# raises an untyped exception is stored in tests/corpus/fuzz/<target>/ — commit it with the fix:
# tests/build/test_fuzz.py replays that directory.  Exit 1 when a crash was found.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=10
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
export PYTHONPATH=tests
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(.venv/bin/python -P -c 'from helpers.fuzz_targets import TARGETS; print("\n".join(TARGETS))')
fi
seconds=$(( minutes * 60 / ${#targets[@]} ))
[ "$seconds" -ge 1 ] || seconds=1
summaries=$(mktemp)
trap 'rm -f "$summaries"' EXIT
for target in "${targets[@]}"; do
  .venv/bin/python -P -m helpers.fuzz_run "$target" --seconds "$seconds" --crashers tests/corpus/fuzz \
    2> >(grep '^fuzz:' >&2) | tail -n 1 >> "$summaries"
done
.venv/bin/python -P - "$summaries" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
print(f"{'target':<22} {'inputs':>10} {'inputs/s':>10} {'seconds':>8}  crashes")
for row in rows:
    print(f"{row['target']:<22} {row['inputs']:>10,} {row['inputs_per_second']:>10,.0f} {row['seconds']:>8}  "
          f"{len(row['crashes'])}")
    for crash in row["crashes"]:
        print(f"    {crash}")
print(f"{'total':<22} {sum(r['inputs'] for r in rows):>10,}")
sys.exit(1 if any(r["crashes"] for r in rows) else 0)
PY
