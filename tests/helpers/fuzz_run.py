"""Coverage-guided fuzzing of one target with atheris (libFuzzer for Python).

    PYTHONPATH=tests .venv/bin/python -P -m helpers.fuzz_run TARGET|all --seconds N [--crashers DIR]

Instruments qtbuild's modules, starts from the target's seeds plus its stored regression inputs,
and runs for N seconds.  ``all`` fuzzes every target in one process (libFuzzer runs once per
process): the first input byte picks the target, so one short run covers every parser (CI).
An exception the target does not declare as typed is a crash: its input
is written to ``DIR/<target>/<sha256 prefix>`` (once per distinct exception type and source line)
and fuzzing goes on, so one run reports every distinct crash.  The last stdout line is a JSON
summary: ``{"target", "inputs", "seconds", "inputs_per_second", "per_target", "crashes": [...]}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback

import atheris

with atheris.instrument_imports(include=["qtbuild"]):
    from helpers.fuzz_targets import TARGETS, regression_inputs


def _where(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/qtbuild/" in f.filename
              or "/formats/" in f.filename or "/runtime/" in f.filename] or traceback.extract_tb(exc.__traceback__)
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS) + ["all"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--crashers", default=None, help="where to store crashing inputs (default: none)")
    args = parser.parse_args()
    targets = list(TARGETS.values()) if args.target == "all" else [TARGETS[args.target]]
    seen: dict[str, str] = {}
    counts = dict.fromkeys((t.name for t in targets), 0)
    started = time.monotonic()

    def summary() -> None:
        elapsed = time.monotonic() - started
        count = sum(counts.values())
        print(json.dumps({"target": args.target, "inputs": count, "seconds": round(elapsed, 1),
                          "inputs_per_second": round(count / elapsed, 1) if elapsed else 0,
                          "per_target": counts, "crashes": sorted(seen.values())}), flush=True)

    def one_input(data: bytes) -> None:
        if len(targets) > 1:
            if not data:
                return
            target, data = targets[data[0] % len(targets)], data[1:]
        else:
            target = targets[0]
        counts[target.name] += 1
        try:
            target.run(data)
        except target.typed:
            pass
        except Exception as exc:  # noqa: BLE001 - the point: anything untyped is a finding
            key = f"{type(exc).__name__} at {_where(exc)}"
            if key not in seen:
                seen[key] = f"{key}: {str(exc)[:200]}"
                if args.crashers:
                    directory = os.path.join(args.crashers, target.name)
                    os.makedirs(directory, exist_ok=True)
                    name = hashlib.sha256(data).hexdigest()[:16]
                    with open(os.path.join(directory, name), "wb") as handle:
                        handle.write(data)
                print(f"fuzz: {target.name}: new crash {seen[key]}", file=sys.stderr, flush=True)
        if time.monotonic() - started > args.seconds:
            summary()
            os._exit(0)  # libFuzzer's own time limit would skip the summary

    with tempfile.TemporaryDirectory(prefix="qtbuild-fuzz-corpus-") as work:
        for number, target in enumerate(targets):
            tag = bytes([number]) if len(targets) > 1 else b""
            for index, seed in enumerate(target.seeds() + [p.read_bytes() for p in regression_inputs(target.name)]):
                with open(os.path.join(work, f"{target.name}-{index}"), "wb") as handle:
                    handle.write(tag + seed)
        sys.setrecursionlimit(10_000)
        atheris.Setup([sys.argv[0], work, f"-max_total_time={args.seconds + 60}", "-timeout=20",
                       "-rss_limit_mb=3072", "-max_len=65536", "-print_final_stats=0"], one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
