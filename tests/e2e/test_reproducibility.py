"""Reproducibility checks with real `docker build`s: a non-reproducible build is caught by
`convert --check` and `diff` names the file; SOURCE_DATE_EPOCH makes mtime-only differences
converge; a rebuild of a reproducible image passes the check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

QTBUILD = [sys.executable, "-c", "from qtbuild.cli import main; main()"]

NON_REPRODUCIBLE = """FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", \
     "/bin/busybox mkdir -p /etc && /bin/busybox cat /proc/sys/kernel/random/uuid > /etc/build-stamp"]
CMD ["/bin/busybox", "cat", "/etc/build-stamp"]
"""

MTIME_ONLY = """FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /srv && echo fixed > /srv/data"]
CMD ["/bin/busybox", "cat", "/srv/data"]
"""


def qtbuild(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*QTBUILD, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def docker_build(context, dockerfile: str, tag: str) -> None:
    (context / "Dockerfile").write_text(dockerfile)
    shutil.copy2("/bin/busybox", context / "busybox")  # keep the mtime: COPY preserves it
    subprocess.run(["docker", "build", "-q", "--no-cache", "-t", tag, str(context)], check=True, capture_output=True)


@pytest.fixture
def context(tmp_path, docker_client):
    if not os.path.exists("/bin/busybox"):
        pytest.fail("busybox-static is required (scripts/install-system.sh installs it)")
    directory = tmp_path / "ctx"
    directory.mkdir()
    yield directory
    for image in docker_client.images.list(name="qtbuild-e2e/repro"):
        docker_client.images.remove(image.id, force=True)


def test_check_catches_non_reproducible_build_and_diff_names_the_file(context, tmp_path):
    docker_build(context, NON_REPRODUCIBLE, "qtbuild-e2e/repro:a")
    first = qtbuild("convert", "docker://qtbuild-e2e/repro:a", "-o", tmp_path / "a.eif", "-q")
    assert first.returncode == 0, first.stderr
    (tmp_path / "a.json").write_text(first.stdout)
    docker_build(context, NON_REPRODUCIBLE, "qtbuild-e2e/repro:a")  # same tag, rebuilt

    by_json = qtbuild("convert", "docker://qtbuild-e2e/repro:a", "--check", tmp_path / "a.json", "-q")
    assert by_json.returncode == 1 and "PCR2" in by_json.stderr

    by_eif = qtbuild("convert", "docker://qtbuild-e2e/repro:a", "-o", tmp_path / "b.eif",
                     "--check", tmp_path / "a.eif", "-q")
    assert by_eif.returncode == 1
    assert "rootfs/etc/build-stamp" in by_eif.stderr

    diff = qtbuild("diff", tmp_path / "a.eif", tmp_path / "b.eif", "--json")
    assert diff.returncode == 1
    report = json.loads(diff.stdout)
    changed = {c["Path"] for c in report["Ramdisks"][1]["Changed"]}
    assert "rootfs/etc/build-stamp" in changed
    assert set(report["Measurements"]["Moved"]) == {"PCR0", "PCR2"}


def test_source_date_epoch_makes_mtime_only_differences_converge(context, tmp_path):
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    outputs = []
    for name in ("x", "y"):
        docker_build(context, MTIME_ONLY, f"qtbuild-e2e/repro:{name}")
        result = qtbuild("convert", f"docker://qtbuild-e2e/repro:{name}", "-o", tmp_path / f"{name}.eif",
                         "--version", "1.0", "-q", env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1]
    # The images differ (layer mtimes, created), so their IDs in the metadata do; nothing else.
    report = json.loads(qtbuild("diff", tmp_path / "x.eif", tmp_path / "y.eif", "--json").stdout)
    assert report["Measurements"]["Moved"] == []
    assert [s["Section"] for s in report["Sections"]] == ["metadata"]
    assert {m["Key"] for m in report["Metadata"]} <= {"DockerInfo.Id", "DockerInfo.Config.Image"}
    without = qtbuild("convert", "docker://qtbuild-e2e/repro:x", "--check", tmp_path / "y.eif",
                      "--version", "1.0", "-q")
    assert without.returncode == 1  # without the clamp the mtimes differ: the check says so


def test_rebuild_of_same_image_passes_check(context, tmp_path):
    docker_build(context, MTIME_ONLY, "qtbuild-e2e/repro:z")
    assert qtbuild("convert", "docker://qtbuild-e2e/repro:z", "-o", tmp_path / "z.eif", "-q").returncode == 0
    again = qtbuild("convert", "docker://qtbuild-e2e/repro:z", "--check", tmp_path / "z.eif", "-q")
    assert again.returncode == 0, again.stderr
    assert "check passed" in again.stderr
