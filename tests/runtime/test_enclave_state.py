"""The runtime directory, enclave records, and supervisor liveness by lock."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qtbuild.runtime.enclave.state import (
    CRASHED,
    OOM,
    RUNNING,
    STARTING,
    STOPPED,
    EnclaveRecord,
    RuntimeDir,
    default_runtime_dir,
    holds_cid,
    observed_status,
    read_record,
    write_record,
)


def record(**fields) -> EnclaveRecord:
    values = {"enclave_id": 0, "cid": 4, "cpus": 2, "memory_mib": 256, "debug": False, "eif_path": "/x.eif"}
    return EnclaveRecord(**{**values, **fields})


def test_default_runtime_dir(monkeypatch):
    monkeypatch.setenv("QTBUILD_RUNTIME_DIR", "/somewhere/rt")
    assert str(default_runtime_dir()) == "/somewhere/rt"
    monkeypatch.delenv("QTBUILD_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    expected = "/run/qtbuild" if os.geteuid() == 0 else "/run/user/1000/qtbuild"
    assert str(default_runtime_dir()) == expected


def test_layout_and_record_round_trip(tmp_path):
    runtime = RuntimeDir(tmp_path / "rt")
    runtime.ensure()
    assert (runtime.vsock_root / "3").is_dir()
    if os.geteuid() == 0:  # bound into enclaves: a tmpfs of its own, so no host path shows in their mountinfo
        assert os.path.ismount(runtime.parent_vsock)
        runtime.ensure()
        assert Path("/proc/self/mountinfo").read_text().count(f" {runtime.parent_vsock} ") == 1
        runtime.unmount()
        assert not os.path.ismount(runtime.parent_vsock)
    assert oct(runtime.enclaves.stat().st_mode & 0o777) == "0o700"
    directory = runtime.enclave(3)
    directory.path.mkdir()
    assert read_record(directory) is None
    written = record(enclave_id=3, measurements={"PCR0": "00"}, cgroup={"version": 1, "paths": {"pids": "/p"}})
    write_record(directory, written)
    assert read_record(directory) == written
    assert [d.enclave_id for d in runtime.enclave_dirs()] == [3]
    assert not [p for p in directory.path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_public_shapes():
    stopped = record(status=STOPPED, exit_code=137, exit_signal=9, process_id=42)
    assert list(stopped.summary()) == ["EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB", "LaunchMode",
                                       "ProcessID", "Status"]
    public = stopped.public()
    assert public["ExitCode"] == 137 and public["Signal"] == 9 and public["LaunchMode"] == "normal"
    assert "ExitCode" not in record(status=RUNNING, exit_code=0).public()
    assert "sandbox_pid" not in public and "cgroup" not in public
    assert public["Cloud"] == "qingtian" and record(cloud="nitro").public()["Cloud"] == "nitro"


def test_unknown_record_keys_are_ignored(tmp_path):
    directory = RuntimeDir(tmp_path).enclave(0)
    directory.path.mkdir(parents=True)
    directory.record.write_text('{"enclave_id": 0, "cid": 4, "cpus": 2, "memory_mib": 256, "debug": true, '
                                '"eif_path": "/x", "from_the_future": 1}')
    assert read_record(directory).debug is True


def test_liveness_follows_the_lock_holder(tmp_path):
    directory = RuntimeDir(tmp_path).enclave(0)
    directory.path.mkdir(parents=True)
    assert not directory.is_alive()
    fd = directory.take_alive_lock()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=[fd])
    os.close(fd)
    try:
        assert directory.is_alive()
        running = record(status=RUNNING)
        assert observed_status(directory, running) == RUNNING
        with pytest.raises(BlockingIOError):
            directory.take_alive_lock()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert not directory.is_alive()
        assert observed_status(directory, running) == CRASHED
        assert observed_status(directory, record(status=STARTING)) == CRASHED
        assert observed_status(directory, record(status=STOPPED)) == STOPPED
    finally:
        holder.kill()


def test_which_statuses_hold_a_cid():
    assert all(holds_cid(s) for s in (STARTING, RUNNING, CRASHED))
    assert not any(holds_cid(s) for s in (STOPPED, OOM))


def test_the_runtime_lock_is_exclusive(tmp_path):
    runtime = RuntimeDir(tmp_path / "rt")
    script = ("import sys; from pathlib import Path; from qtbuild.runtime.enclave.state import RuntimeDir\n"
              "with RuntimeDir(Path(sys.argv[1])).locked(): print('in', flush=True)")
    with runtime.locked():
        other = subprocess.Popen([sys.executable, "-c", script, str(runtime.path)], stdout=subprocess.PIPE,
                                 text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        waiting, _, _ = select.select([other.stdout], [], [], 0.5)
        assert not waiting  # blocked while we hold the lock
    assert other.stdout.readline() == "in\n"
    other.wait(10)
    runtime.unmount()


def test_records_are_replaced_without_fsync(tmp_path, monkeypatch):
    """Regression: every record write fsynced the file and its directory — six times on `run`'s
    way to "Running", ≈ 10 ms each on a disk-backed runtime directory."""
    directory = RuntimeDir(tmp_path / "rt").enclave(0)
    directory.path.mkdir(parents=True)
    monkeypatch.setattr(os, "fsync", lambda descriptor: pytest.fail("an enclave record was fsynced"))
    write_record(directory, record(enclave_id=0))
    write_record(directory, record(enclave_id=0, measurements={"PCR0": "00"}))
    assert read_record(directory) == record(enclave_id=0, measurements={"PCR0": "00"})
