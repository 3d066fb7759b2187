"""Layers read in place are verified while the EIF is written; the output is committed only after.

A layer that fails its verification after the write began must leave nothing behind: no output
file (nor the temporary one), the one-line error of the verification, exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
from click.testing import CliRunner
from test_flatten import BytesLayer, M, build_tar

from qtbuild.cli.app import cli
from qtbuild.convert import pipeline
from qtbuild.convert.verify_ahead import VerifyAhead
from qtbuild.convert.verify_gate import current_deferral, deferred_verification
from qtbuild.errors import ImageError
from qtbuild.formats.eif_writer import BytesSource

from helpers.imagefactory import default_config, file, make_layer, write_docker_archive, write_oci_layout

ORIGINAL = b"original file data, " * 4000
LAYERS = [
    make_layer([file("bin/app", os.urandom(20_000), mode=0o755), file("etc/hostname", b"enclave\n")]),
    make_layer([file("data/blob", ORIGINAL)]),
]
CONFIG = default_config(cmd=["/bin/app"])


def tampered_image(tmp_path, kind: str) -> str:
    """A docker-archive or an OCI layout with uncompressed layers (read in place) whose second
    layer's file data was changed after it was written: its tar headers still parse, only its
    digest tells.  Returns the source reference."""
    if kind == "docker-archive":
        path = tmp_path / "image.tar"
        write_docker_archive(path, LAYERS, CONFIG, layout="legacy")
    else:
        written = write_oci_layout(tmp_path / "layout", LAYERS, CONFIG, compression=None)
        path = tmp_path / "layout" / "blobs" / "sha256" / written.layer_digests[1].split(":")[1]
    data = path.read_bytes()
    at = data.index(ORIGINAL)
    path.write_bytes(data[:at] + b"X" + data[at + 1:])
    return f"docker-archive:{path}" if kind == "docker-archive" else f"oci:{tmp_path / 'layout'}"


def convert(source: str, output) -> object:
    return CliRunner().invoke(cli, ["convert", source, "-o", str(output), "-q"], env={"SOURCE_DATE_EPOCH": "0"})


@pytest.fixture
def verification_held_until_the_write(monkeypatch):
    """Every in-place layer's verification starts only once the EIF write began (at most 20 s
    later), so a mismatch is discovered while or after the output is written.  Yields a list that
    records, per verification, whether the write had begun when it started."""
    writing = threading.Event()
    started_late: list[bool] = []
    real_verify, real_write = VerifyAhead._verify, pipeline.write_eif

    def late_verify(self, layer):
        started_late.append(writing.wait(timeout=20))
        return real_verify(self, layer)

    def write_eif(*args, **kwargs):
        writing.set()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(VerifyAhead, "_verify", late_verify)
    monkeypatch.setattr(pipeline, "write_eif", write_eif)
    return started_late


@pytest.mark.parametrize("kind, existing", [("docker-archive", None), ("docker-archive", b"an older image\n"),
                                            ("oci", None)])
def test_a_tampered_layer_discovered_during_the_write_leaves_no_output(tmp_path, verification_held_until_the_write,
                                                                        kind, existing):
    source = tampered_image(tmp_path, kind)
    output = tmp_path / "out" / "app.eif"
    output.parent.mkdir()
    if existing is not None:
        output.write_bytes(existing)
    result = convert(source, output)
    assert verification_held_until_the_write and all(verification_held_until_the_write)  # discovered late
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "digest mismatch" in lines[0] and "Traceback" not in result.output
    # no partial output, no temporary file; an older image at the path is left as it was
    assert os.listdir(output.parent) == ([] if existing is None else ["app.eif"])
    if existing is not None:
        assert output.read_bytes() == existing


def test_an_intact_image_verified_late_gives_the_same_eif(tmp_path, verification_held_until_the_write, monkeypatch):
    write_docker_archive(tmp_path / "image.tar", LAYERS, CONFIG, layout="legacy")
    late = convert(f"docker-archive:{tmp_path / 'image.tar'}", tmp_path / "late.eif")
    assert late.exit_code == 0, late.output
    assert verification_held_until_the_write and all(verification_held_until_the_write)
    monkeypatch.undo()
    early = convert(f"docker-archive:{tmp_path / 'image.tar'}", tmp_path / "early.eif")
    assert early.exit_code == 0, early.output
    assert (tmp_path / "late.eif").read_bytes() == (tmp_path / "early.eif").read_bytes()


# -- the gate itself ---------------------------------------------------------------------------------


class FakeVerifications:
    """Verifications that end when ``done`` is set, with ``failure`` (None: they passed)."""

    def __init__(self, failure: BaseException | None = None):
        self.done = threading.Event()
        self.failure = failure
        self.closed = False

    def first_failure(self) -> BaseException | None:
        assert self.done.wait(timeout=10)
        return self.failure

    def close(self) -> None:
        self.closed = True


def test_the_gated_stream_ends_only_after_the_verification_passed():
    verifications = FakeVerifications()
    with deferred_verification() as deferral:
        deferral.adopt(verifications)
        chunks = deferral.gate(BytesSource(b"ramdisk")).chunks()
        assert bytes(next(chunks)) == b"ramdisk"
        ended = threading.Event()
        consumer = threading.Thread(target=lambda: (list(chunks), ended.set()))
        consumer.start()
        assert not ended.wait(timeout=0.2)  # the last chunk was taken, but the stream has not ended
        verifications.done.set()
        consumer.join(timeout=10)
        assert ended.is_set()
    assert verifications.closed


def test_a_failed_verification_stops_the_stream_at_the_next_chunk_and_is_raised():
    failure = ImageError("layer sha256:abc: digest mismatch, expected sha256:abc, got sha256:def")
    verifications = FakeVerifications(failure)
    with pytest.raises(ImageError, match="digest mismatch") as raised, deferred_verification() as deferral:
        deferral.adopt(verifications)
        taken = []
        source = ChunkSource([b"a", b"b", b"c"])
        for chunk in deferral.gate(source).chunks():
            taken.append(chunk)
            verifications.done.set()
            deferral.failed.set()
    assert raised.value is failure and taken == [b"a"] and verifications.closed


def test_another_error_in_the_block_gives_way_to_a_verification_failure():
    failure = ImageError("layer sha256:abc: digest mismatch")
    verifications = FakeVerifications(failure)
    verifications.done.set()
    with pytest.raises(ImageError, match="digest mismatch"), deferred_verification() as deferral:
        deferral.adopt(verifications)
        raise ValueError("what the tampered bytes made fail")


def test_without_a_failure_the_blocks_own_error_stands():
    verifications = FakeVerifications()
    verifications.done.set()
    with pytest.raises(ValueError, match="its own"), deferred_verification() as deferral:
        deferral.adopt(verifications)
        raise ValueError("its own")


# -- VerifyAhead under a deferral ----------------------------------------------------------------------


class HeldLayer(BytesLayer):
    """A layer whose verification waits for ``release`` and then fails or passes."""

    def __init__(self, tar: bytes, release: threading.Event, error: str | None = None):
        super().__init__(tar)
        self._release, self._error = release, error

    def open_uncompressed(self):
        assert self._release.wait(timeout=10)
        if self._error is not None:
            raise ImageError(self._error)
        return super().open_uncompressed()


def test_under_a_deferral_the_tree_does_not_wait_and_the_deferral_does():
    release = threading.Event()
    layers = {0: HeldLayer(build_tar([M("a", data=b"1")]), release),
              1: HeldLayer(build_tar([M("b", data=b"22")]), release, error="layer 2: digest mismatch"),
              2: HeldLayer(build_tar([M("c", data=b"333")]), release, error="layer 3: digest mismatch")}
    with deferred_verification() as deferral:
        with VerifyAhead(layers) as verifier:
            for index in layers:
                verifier.result(index)  # returns at once: nothing is known yet
        assert not deferral.failed.is_set()
        release.set()
        with pytest.raises(ImageError, match="layer 2: digest mismatch"):  # the lowest layer that failed
            deferral.finish()
        assert deferral.failed.is_set()


def test_under_a_deferral_a_failure_already_known_is_raised_by_result():
    release = threading.Event()
    release.set()
    layers = {0: HeldLayer(build_tar([M("a", data=b"1")]), release, error="layer 1: digest mismatch")}
    with (deferred_verification() as deferral, pytest.raises(ImageError, match="layer 1: digest mismatch"),
          VerifyAhead(layers) as verifier):
        assert deferral.failed.wait(timeout=10)
        verifier.result(0)


def test_a_verify_ahead_block_left_by_an_error_stops_its_verifications_even_under_a_deferral():
    release = threading.Event()
    layers = {0: HeldLayer(build_tar([M("a", data=b"1")]), release)}
    with deferred_verification() as deferral, pytest.raises(KeyError), VerifyAhead(layers) as verifier:
        release.set()
        raise KeyError("flatten failed")
    with pytest.raises(RuntimeError, match="stopped"):
        verifier.first_failure()
    assert deferral.first_failure() is None  # nothing was handed over


class CountingLayer(BytesLayer):
    """A layer whose verification records that it started, then waits for ``release``."""

    def __init__(self, tar: bytes, started: list, release: threading.Event):
        super().__init__(tar)
        self._started, self._release = started, release

    def open_uncompressed(self):
        self._started.append(self)
        assert self._release.wait(timeout=10)
        return super().open_uncompressed()


@pytest.mark.parametrize("deferred, at_once", [(False, 2), (True, 1)])
def test_under_a_deferral_the_verifications_leave_one_cpu_to_the_tree(monkeypatch, deferred, at_once):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    started: list = []
    release = threading.Event()
    layers = {index: CountingLayer(build_tar([M(f"f{index}", data=b"x" * (index + 1))]), started, release)
              for index in range(3)}
    with deferred_verification() if deferred else contextlib.nullcontext():
        with VerifyAhead(layers) as verifier:
            deadline = time.monotonic() + 10
            while len(started) < at_once and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # a second worker, if there were one, would have started by now
            assert len(started) == at_once
            release.set()
            for index in layers:
                verifier.result(index)
        if deferred:
            current_deferral().finish()
    assert len(started) == 3


class ChunkSource:
    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks
        self.size = sum(map(len, chunks))

    def chunks(self):
        yield from self._chunks
