"""The one atomic, fsynced file writer, and that nothing toggles the process umask to set modes."""

from __future__ import annotations

import os
import stat

import pytest

from qtbuild.formats.eif import EifReader
from qtbuild.formats.eif_writer import write_eif
from qtbuild.inspect.extract import extract_eif
from qtbuild.runtime.files import write_atomically


@pytest.fixture
def umask():
    """A setter for the process umask (restored afterwards), for use before os.umask is patched."""
    original = os.umask(0o022)
    real_umask = os.umask

    def set_umask(value: int) -> None:
        real_umask(value)

    yield set_umask
    real_umask(original)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, mode, expected", [(0o022, 0o600, 0o600), (0o022, 0o644, 0o644),
                                                  (0o027, 0o644, 0o640), (0o000, 0o600, 0o600)])
def test_the_kernel_applies_the_umask_to_the_mode(tmp_path, umask, mask, mode, expected, monkeypatch):
    umask(mask)
    monkeypatch.setattr(os, "umask", lambda value: pytest.fail("the process umask was changed"))
    write_atomically(tmp_path / "key.pem", b"secret", mode)
    assert mode_of(tmp_path / "key.pem") == expected


def test_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_keeps_the_old_content_and_cleans_up(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.json"]


def test_exclusive_creation_refuses_an_existing_file(tmp_path):
    target = tmp_path / "master.key"
    write_atomically(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomically(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["master.key"]


def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(tmp_path / "x", b"data")
    assert synced == ["file", "dir"]


def test_the_eif_writer_and_extract_set_modes_without_touching_the_umask(tmp_path, umask, monkeypatch):
    umask(0o027)
    monkeypatch.setattr(os, "umask", lambda value: pytest.fail("the process umask was changed"))
    eif = tmp_path / "image.eif"
    write_eif(eif, kernel=b"kernel", cmdline="console=ttyS0", ramdisks=[b"ramdisk"], metadata=None)
    assert mode_of(eif) == 0o640
    with EifReader.open(eif) as reader:
        extract_eif(reader, tmp_path / "out", unpack=False)
    assert mode_of(tmp_path / "out") == 0o750


def test_a_non_durable_write_is_atomic_without_fsync(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda descriptor: pytest.fail("fsync in a non-durable write"))
    write_atomically(tmp_path / "record.json", b"old", durable=False)
    write_atomically(tmp_path / "record.json", b"new", durable=False)
    assert (tmp_path / "record.json").read_bytes() == b"new" and os.listdir(tmp_path) == ["record.json"]
