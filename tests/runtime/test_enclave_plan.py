"""The sandbox spec of an enclave: root, binds, environment and limits."""

from __future__ import annotations

from pathlib import Path

from qtbuild.formats.launch_record import Launch
from qtbuild.formats.measure import Measurements
from qtbuild.runtime.enclave.loader import LoadedImage
from qtbuild.runtime.enclave.plan import enclave_env, sandbox_spec
from qtbuild.runtime.enclave.state import EnclaveRecord, RuntimeDir


def test_vsock_settings_replace_the_images():
    env = enclave_env(["PATH=/bin", "QTBUILD_VSOCK_DIR=/evil", "QTBUILD_VSOCK_CID=3", "A=1"], 7)
    assert env == ["PATH=/bin", "A=1", "QTBUILD_VSOCK_DIR=/run/vsock", "QTBUILD_VSOCK_CID=7",
                   "QTBUILD_VSOCK_TRANSPORT=emulated"]


def test_spec_binds_only_this_enclaves_sockets(tmp_path):
    runtime = RuntimeDir(tmp_path)
    directory = runtime.enclave(2)
    record = EnclaveRecord(enclave_id=2, cid=9, cpus=2, memory_mib=256, debug=False, eif_path="/x.eif",
                           no_limits=True, sandbox_name="enclave-2-abc")
    pcr = b"\0" * 48
    image = LoadedImage(Measurements(pcr, pcr, pcr), Launch(["/app"], ["PATH=/bin"], "/srv", 5, 6, [7]),
                        str(tmp_path / "rootfs"), 10 << 20)
    spec = sandbox_spec(record, image, directory, runtime.vsock_root, output_fd=None)
    binds = {bind.target: (bind.source, bind.read_only) for bind in spec.binds}
    assert binds == {
        "/dev/qtsm": (str(directory.qtsm_socket), True),  # the QingTian profile's device only
        "/run/vsock/3": (str(runtime.vsock_root / "3"), True),
        "/run/vsock/9": (str(runtime.vsock_root / "9"), False),
    }
    assert spec.memory_bytes == 256 << 20  # the unpacked image is charged to the same cgroup
    assert (spec.cpus, spec.no_limits, spec.name) == (2, True, "enclave-2-abc")
    assert (spec.argv, spec.cwd, spec.uid, spec.gid, spec.groups) == (["/app"], "/srv", 5, 6, [7])
    assert Path(spec.root) == tmp_path / "rootfs" and spec.stdout is None and spec.stderr is None


def test_nitro_profile_binds_dev_nsm(tmp_path):
    runtime = RuntimeDir(tmp_path)
    directory = runtime.enclave(0)
    record = EnclaveRecord(enclave_id=0, cid=16, cpus=2, memory_mib=256, debug=False, eif_path="/x.eif",
                           cloud="nitro")
    pcr = b"\0" * 48
    image = LoadedImage(Measurements(pcr, pcr, pcr), Launch(["/app"], [], "/", 0, 0, []), str(tmp_path), 0)
    targets = {bind.target for bind in sandbox_spec(record, image, directory, runtime.vsock_root, output_fd=None).binds}
    assert "/dev/nsm" in targets and "/dev/qtsm" not in targets
