"""Tests for qtbuild.runtime.enclave.charged: loading from inside the enclave's memory cgroup."""

from __future__ import annotations

import os
import subprocess

import pytest

from qtbuild.runtime.enclave.charged import load_charged
from qtbuild.runtime.enclave.errors import E_MEMORY, EnclaveError
from qtbuild.runtime.sandbox.cgroups import Limits, create

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups and mounting a tmpfs needs root")
MiB = 1 << 20


@pytest.fixture
def cgroup():
    group = create(f"qtbt-charged-{os.getpid()}", Limits(memory_bytes=64 * MiB, cpus=None, pids_max=64),
                   "/sys/fs/cgroup")
    yield group
    group.remove()


def usage(group) -> int:
    directory = group.paths["memory"]
    name = "memory.current" if group.version == 2 else "memory.usage_in_bytes"
    with open(os.path.join(directory, name)) as handle:
        return int(handle.read())


def test_files_created_by_the_load_stay_charged_to_the_cgroup(cgroup, tmp_path):
    memory = tmp_path / "memory"
    memory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(memory)], check=True)
    try:
        before = usage(cgroup)

        def load() -> str:
            for index in range(5000):
                (memory / str(index)).touch()
            (memory / "data").write_bytes(b"x" * (8 * MiB))
            return "loaded"

        assert load_charged(cgroup, load) == "loaded"
        assert usage(cgroup) - before >= 8 * MiB + 5000 * 500  # pages and inodes, after the loader has exited
    finally:
        subprocess.run(["umount", "-l", str(memory)], check=True)


def test_errors_come_back_and_an_oom_kill_is_a_memory_error(cgroup):
    def refuse():
        raise EnclaveError("the image is bad", check_failed=True)

    with pytest.raises(EnclaveError, match="the image is bad") as caught:
        load_charged(cgroup, refuse)
    assert caught.value.check_failed

    def crash():
        raise KeyError("boom")

    with pytest.raises(EnclaveError, match="loading the image failed: KeyError: 'boom'"):
        load_charged(cgroup, crash)

    def fill_memory():
        return len([bytearray(MiB) for _ in range(512)])  # 512 MiB in a 64 MiB cgroup

    with pytest.raises(EnclaveError, match="does not fit in the enclave memory") as caught:
        load_charged(cgroup, fill_memory)
    assert caught.value.code == E_MEMORY
