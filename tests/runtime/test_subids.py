"""Tests for qtbuild.runtime.sandbox.subids: the subordinate id range of sandboxes started by root."""

from __future__ import annotations

import pytest

from qtbuild.runtime.sandbox import SandboxError
from qtbuild.runtime.sandbox.subids import DEFAULT_COUNT, FIRST_ID, IdRange, enclave_ids


def files(tmp_path, subuid="", subgid="", passwd="root:x:0:0::/root:/bin/sh\n", group="root:x:0:\n") -> dict:
    paths = {}
    for name, text in (("subuid", subuid), ("subgid", subgid), ("passwd", passwd), ("group", group)):
        path = tmp_path / name
        path.write_text(text)
        paths[name] = str(path)
    return paths


def test_an_existing_range_is_used(tmp_path):
    paths = files(tmp_path, subuid="alice:100000:65536\nqtbuild-enclave:300000:70000\n",
                  subgid="qtbuild-enclave:400000:65536\n")
    assert enclave_ids(**paths) == IdRange(300000, 400000, 65536)
    assert (tmp_path / "subuid").read_text().count("\n") == 2  # nothing appended


def test_a_missing_range_is_allocated_clear_of_others_and_of_passwd_ids(tmp_path):
    paths = files(tmp_path, subuid="alice:100000:65536\nbob:165536:65536", subgid="",
                  passwd="root:x:0:0::/:/bin/sh\nodd:x:250000:250000::/:/bin/sh\n")
    ids = enclave_ids(**paths)
    assert ids.uid == FIRST_ID + 3 * DEFAULT_COUNT  # after alice, bob and the block holding uid 250000
    assert ids.gid == FIRST_ID and ids.count == DEFAULT_COUNT
    assert (tmp_path / "subuid").read_text().endswith(f"bob:165536:65536\nqtbuild-enclave:{ids.uid}:65536\n")
    assert (tmp_path / "subgid").read_text() == f"qtbuild-enclave:{FIRST_ID}:65536\n"
    assert enclave_ids(**paths) == ids  # stable once written
    assert ids.host_uid(0) == ids.uid and ids.contains(65534) and not ids.contains(65536)


def test_the_name_is_configurable(tmp_path, monkeypatch):
    paths = files(tmp_path, subuid="builder:500000:65536\n", subgid="builder:600000:65536\n")
    monkeypatch.setenv("QTBUILD_ENCLAVE_USER", "builder")
    assert enclave_ids(**paths) == IdRange(500000, 600000, 65536)


@pytest.mark.parametrize(("subuid", "message"), [
    ("qtbuild-enclave:0:65536\n", "starts at host id 0"),
    ("qtbuild-enclave:x:65536\n", "expected name:first:count"),
    ("qtbuild-enclave:100000:0\n", "out of bounds"),
])
def test_bad_entries_are_refused(tmp_path, subuid, message):
    with pytest.raises(SandboxError, match=message):
        enclave_ids(**files(tmp_path, subuid=subuid))
