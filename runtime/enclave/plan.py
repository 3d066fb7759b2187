"""The sandbox an enclave's application runs in: :func:`sandbox_spec` turns a loaded image and
the enclave's record into a :class:`qtbuild.runtime.sandbox.SandboxSpec`.

Inside the sandbox:

* ``/`` is the image's ``rootfs`` in enclave memory;
* ``/dev/qtsm`` and ``/dev/nsm`` are the enclave's security-module socket (the host path is
  never visible, so no other enclave or sandbox can reach it);
* ``/run/vsock`` is the enclave's emulated vsock root, holding exactly two host directories:
  ``3/`` (the parent's listeners, read-only: an enclave cannot listen as the parent) and
  ``<cid>/`` (its own listeners, writable); the environment carries
  ``QTBUILD_VSOCK_DIR=/run/vsock``, ``QTBUILD_VSOCK_CID=<cid>``,
  ``QTBUILD_VSOCK_TRANSPORT=emulated`` (replacing any the image sets);
* memory: the cgroup limit is ``--mem``; the unpacked image is charged to the same cgroup
  (it occupies enclave memory as an initramfs does on hardware), as is anything the enclave
  writes to its vsock directory; CPUs: a quota of ``--cpus``, pinned to ``--cpu-ids`` when given
  (a cpuset the application cannot widen); pids: the sandbox default.
"""

from __future__ import annotations

import os
from pathlib import Path

from qtbuild.runtime.sandbox import Bind, SandboxSpec
from qtbuild.runtime.sandbox.cgroups import Limits
from qtbuild.runtime.sdk import vsock

from .loader import LoadedImage
from .state import EnclaveDir, EnclaveRecord

__all__ = ["VSOCK_MOUNT", "cgroup_limits", "enclave_env", "sandbox_spec"]

VSOCK_MOUNT = "/run/vsock"
_VSOCK_VARIABLES = (vsock.ENV_DIR, vsock.ENV_CID, vsock.ENV_TRANSPORT)


def enclave_env(image_env: list[str], cid: int) -> list[str]:
    """The image's environment with the enclave's vsock settings in place of any it had."""
    kept = [entry for entry in image_env if entry.partition("=")[0] not in _VSOCK_VARIABLES]
    return [*kept, f"{vsock.ENV_DIR}={VSOCK_MOUNT}", f"{vsock.ENV_CID}={cid}",
            f"{vsock.ENV_TRANSPORT}={vsock.EMULATED}"]


def cgroup_limits(record: EnclaveRecord) -> Limits:
    """The enclave's limits: ``--mem`` (image included), ``--cpus``, the sandbox's pids cap."""
    return Limits(memory_bytes=record.memory_mib << 20, cpus=record.cpus, pids_max=SandboxSpec.pids_max,
                  cpu_ids=_cpu_ids(record))


def _cpu_ids(record: EnclaveRecord) -> tuple[int, ...] | None:
    return tuple(record.cpu_ids) if record.cpu_ids is not None else None


def sandbox_spec(record: EnclaveRecord, image: LoadedImage, directory: EnclaveDir, vsock_root: Path, *,
                 output_fd: int | None) -> SandboxSpec:
    """The spec for ``record``'s application; ``output_fd`` receives its stdout and stderr
    (None: /dev/null)."""
    # imported here: the supervisor loads the image before it pays for the cloud profiles' imports
    from qtbuild.runtime.qtsm.clouds import profile as cloud_profile

    launch = image.launch
    binds = [Bind(os.fspath(directory.qtsm_socket), cloud_profile(record.cloud).device_path)]
    binds.append(Bind(os.fspath(vsock_root / str(vsock.PARENT_CID)), f"{VSOCK_MOUNT}/{vsock.PARENT_CID}"))
    binds.append(Bind(os.fspath(vsock_root / str(record.cid)), f"{VSOCK_MOUNT}/{record.cid}", read_only=False))
    return SandboxSpec(
        root=image.rootfs, argv=launch.argv, env=enclave_env(launch.env, record.cid), cwd=launch.cwd,
        uid=launch.uid, gid=launch.gid, groups=launch.groups,
        memory_bytes=record.memory_mib << 20, cpus=record.cpus, cpu_ids=_cpu_ids(record),
        binds=binds, stdout=output_fd, stderr=output_fd, no_limits=record.no_limits, name=record.sandbox_name,
    )
