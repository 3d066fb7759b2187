"""convert and measure show a tqdm bar only to someone watching, and pay tqdm's import only then."""

from __future__ import annotations

import subprocess
import sys

from qtbuild.convert.progress_bar import HiddenBar, progress_bar

from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

# Runs the CLI in a fresh interpreter (stderr a pipe, as in a pipeline) and prints which of the
# modules only a shown bar or a signature needs were imported.
_PROBE = """
import sys
from qtbuild.cli.app import cli
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    print(sorted(m for m in ("tqdm", "cryptography", "importlib.metadata") if m in sys.modules))
"""


def test_a_quiet_bar_is_hidden():
    bar = progress_bar("layers", quiet=True)
    assert isinstance(bar, HiddenBar) and bar.disable
    assert bar.update(10) is None
    bar.reset(total=5)
    bar.close()


def test_a_bar_on_a_pipe_is_hidden(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert isinstance(progress_bar("ramdisk", quiet=False), HiddenBar)


def test_measure_and_convert_on_a_pipe_import_neither_tqdm_nor_cryptography(tmp_path):
    write_oci_layout(tmp_path / "img", [make_tar([file("bin/app", b"#!/bin/sh\n")])],
                     default_config(cmd=["/bin/app"]))
    for args in (["measure", f"oci:{tmp_path / 'img'}"],
                 ["convert", f"oci:{tmp_path / 'img'}", "-o", str(tmp_path / "out.eif")]):
        run = subprocess.run([sys.executable, "-P", "-c", _PROBE, *args], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == "[]", (args, run.stdout)
