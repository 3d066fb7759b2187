"""The write phase's progress total: FlatTree.totals sums the tree without building it, the
customer ramdisk's estimate stays within 3 bytes an entry of what is written (a real directory
tree, with a layer replacing and whiting out part of it), the EIF total is what write_eif
reports writing, and ``convert`` on a terminal shows the ramdisk bar with a total (hidden with
--quiet, and off a terminal)."""

from __future__ import annotations

import email
import encodings
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import tarfile
import termios
from pathlib import Path

import pytest
from test_flatten import BytesLayer, M, layers_of

import qtbuild
import qtbuild.formats
import qtbuild.runtime
from qtbuild.convert.boot_profiles import load_profile
from qtbuild.convert.flatten import TreeTotals, flatten
from qtbuild.convert.ramdisk import customer_ramdisk, estimated_size
from qtbuild.convert.write_total import estimated_write_total
from qtbuild.formats.eif import HEADER_SIZE
from qtbuild.formats.eif_writer import write_eif
from qtbuild.formats.launch_record import Launch

from helpers.imagefactory import default_config, directory, file, make_layer, symlink, write_oci_layout

LAUNCH = Launch(["/bin/app"], ["PATH=/bin"])
#: A real tree: the package's own sources (qtbuild/, formats/, runtime/) and two of the standard
#: library's packages, caches left out.
SOURCES = {"usr/lib/qtbuild": Path(qtbuild.__file__).parent, "usr/lib/formats": Path(qtbuild.formats.__file__).parent,
           "usr/lib/runtime": Path(qtbuild.runtime.__file__).parent,
           "usr/lib/python/encodings": Path(encodings.__file__).parent,
           "usr/lib/python/email": Path(email.__file__).parent}


def written_size(tree) -> int:
    return sum(len(chunk) for chunk in customer_ramdisk(tree, LAUNCH).chunks())


def test_totals_sum_the_entries_after_whiteouts_replacements_and_hardlinks():
    lower = [M("etc/", "dir"), M("etc/a/", "dir"), M("etc/a/deep/f", data=b"12345"), M("etc/link", "symlink",
             target="a/deep/f"), M("gone/", "dir"), M("gone/x", data=b"x" * 100), M("data/one", data=b"linked"),
             M("data/two", "hardlink", target="data/one"), M("replaced", data=b"r" * 50), M("dev", "char", dev=(1, 3))]
    upper = [M(".wh.gone"), M("replaced", data=b"new"), M("etc/b/c", data=b"implicit parent"),
             M("more/three", "hardlink", target="data/two")]
    with flatten(layers_of(lower, upper, in_place=True)) as tree:
        entries = tree.entries()
        groups = {entry.hardlink_key: entry.size for entry in entries if entry.hardlink_key is not None}
        data = sum(len(entry.link_target or b"") + (entry.size if entry.hardlink_key is None else 0)
                   for entry in entries)
        assert tree.totals() == TreeTotals(len(entries), sum(len(entry.path) for entry in entries),
                                           data + sum(groups.values()))
        assert len(groups) == 1 and tree.totals().data_bytes == 5 + len(b"a/deep/f") + 6 + 3 + 15


def real_tree_layers():
    """The package's sources as a lower layer, and an upper one that replaces a file, whites out
    a directory, adds files and a symlink."""
    lower = io.BytesIO()
    with tarfile.open(fileobj=lower, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in SOURCES.items():
            tar.add(path, arcname=name, filter=lambda info: None if "__pycache__" in info.name else info)
    upper = make_layer([directory("usr"), directory("usr/lib"), directory("usr/lib/qtbuild"),
                        file("usr/lib/qtbuild/__init__.py", b"replaced\n"),
                        file("usr/lib/qtbuild/.wh.cli"), file("usr/lib/qtbuild/new.txt", b"n" * 1001),
                        symlink("usr/lib/qtbuild/latest", "convert")])
    return [lower.getvalue(), upper]


def test_the_ramdisk_estimate_is_within_3_bytes_an_entry_of_the_written_size():
    layers = [BytesLayer(tar, in_place=True) for tar in real_tree_layers()]
    with flatten(layers) as tree:
        entries = tree.totals().entries
        assert entries > 300
        error = estimated_size(tree, LAUNCH) - written_size(tree)
    assert abs(error) <= 3 * entries, (error, entries)


def test_the_write_total_is_what_write_eif_reports_writing():
    profile = load_profile(None, "x86_64")
    metadata = json.dumps({"ImageName": "enclave"}).encode()
    with flatten(layers_of([M("bin/app", data=b"#!/bin/sh\n" * 300), M("etc/hosts", data=b"127.0.0.1 x\n")],
                           in_place=True)) as tree:
        counted = []
        result = write_eif(None, kernel=profile.kernel, cmdline=profile.cmdline,
                           ramdisks=[profile.bootstrap, customer_ramdisk(tree, LAUNCH)], metadata=metadata,
                           progress=counted.append)
        estimate = estimated_write_total(profile, profile.cmdline, metadata, tree, LAUNCH)
        entries = tree.totals().entries
    assert sum(counted) == result.size - HEADER_SIZE
    assert abs(estimate - sum(counted)) <= 3 * entries


@pytest.fixture
def image(tmp_path):
    lower = make_layer([directory("bin"), file("bin/app", b"x" * 300_000, mode=0o755)])
    write_oci_layout(tmp_path / "layout", [lower], default_config(cmd=["/bin/app"]))
    return f"oci:{tmp_path / 'layout'}:latest"


def convert_on_a_terminal(image: str, output: Path, *options: str) -> bytes:
    """What ``qtbuild convert`` writes to stderr when stderr is a terminal."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing in 0 columns
    try:
        process = subprocess.Popen([sys.executable, "-m", "qtbuild", "convert", image, "-o", str(output), *options],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer closed it
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0, shown
        process.stdout.close()
    finally:
        os.close(controller)
    return shown


def test_convert_on_a_terminal_shows_the_ramdisk_bar_with_a_total(image, tmp_path):
    shown = convert_on_a_terminal(image, tmp_path / "app.eif")
    assert re.search(rb"ramdisk:\s+\d+%\|", shown), shown  # a percentage: the bar has a total
    assert b"ramdisk:" not in convert_on_a_terminal(image, tmp_path / "quiet.eif", "--quiet")
    piped = subprocess.run([sys.executable, "-m", "qtbuild", "convert", image, "-o", str(tmp_path / "piped.eif")],
                           capture_output=True, check=True)
    assert b"ramdisk" not in piped.stderr


def test_no_bar_shown_means_tqdm_is_not_imported(image, tmp_path):
    """Off a terminal (and with --quiet) the pipeline's bars are stand-ins: tqdm's import (35 ms,
    before the first layer is read) is not paid, and the EIF is the same."""
    code = ("import sys; from qtbuild.convert.pipeline import ConvertOptions, convert; "
            "convert(sys.argv[1], ConvertOptions(output=sys.argv[2])); print('tqdm' in sys.modules)")
    piped = subprocess.run([sys.executable, "-P", "-c", code, image, str(tmp_path / "piped.eif")],
                           capture_output=True, check=True, text=True)
    assert piped.stdout.strip() == "False", piped.stderr
    convert_on_a_terminal(image, tmp_path / "shown.eif")
    assert (tmp_path / "piped.eif").read_bytes() == (tmp_path / "shown.eif").read_bytes()
