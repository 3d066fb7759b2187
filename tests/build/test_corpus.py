"""The hostile image/EIF corpus (tests/corpus, made by tests/corpus/generate.py) through the real CLI.

Every case must be refused the way ``cases.json`` says: the expected exit code (2 for bad input,
1 for a failed ``verify`` check, 0 where ``describe`` reports the problem in its document), the
expected message, exactly one line on stderr for exit 2, no traceback, and nothing left behind:
no output file or directory, nothing in the temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CASES = json.loads((CORPUS / "cases.json").read_text())


def qtbuild(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp), LC_ALL="C.UTF-8")
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run([sys.executable, "-P", "-c", "from qtbuild.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_every_corpus_file_has_a_case():
    files = {f"{sub}/{path.name}" for sub in ("images", "eifs") for path in (CORPUS / sub).iterdir()}
    assert files - {case["input"] for case in CASES.values()} == {"eifs/valid.eif"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_cleanly(name, tmp_path):
    case = CASES[name]
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    args = [arg.format(input=CORPUS / case["input"], out=out) for arg in case["command"]]
    result = qtbuild(args, tmp)
    assert result.returncode == case["exit"], (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    if case["exit"] == 2:
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("qtbuild: error: "), result.stderr
    assert case["stderr"] in result.stderr + result.stdout, (result.stdout[-2000:], result.stderr)
    assert os.listdir(out) == [] and os.listdir(tmp) == []
