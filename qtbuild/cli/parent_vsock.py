"""The vsock configuration of the parent-side commands (``proxy``, ``vsock``, ``handoff``):
one rule, so every command reaches the enclaves ``qtbuild run`` starts the same way."""

from __future__ import annotations

import os

from qtbuild.runtime.enclave.state import RuntimeDir
from qtbuild.runtime.sdk import vsock


def parent_vsock_config(transport: str | None, vsock_dir: str | None) -> vsock.VsockConfig:
    """The parent's (CID 3) configuration from a command's ``--transport`` and ``--vsock-dir``
    (None when not given) and the ``QTBUILD_VSOCK_*`` environment, the options winning.

    With no vsock directory named: ``emulated`` means the local runtime's root (``<runtime
    dir>/vsock``, where ``qtbuild run`` puts enclaves; created when missing); no transport either
    means that root when it exists, so the parent reaches local enclaves even on a host that also
    has a real /dev/vsock, else ``auto``.
    """
    environ = dict(os.environ)
    if transport:
        environ[vsock.ENV_TRANSPORT] = transport
    if vsock_dir:
        environ[vsock.ENV_DIR] = vsock_dir
    if vsock.ENV_DIR not in environ:
        requested = environ.get(vsock.ENV_TRANSPORT) or vsock.AUTO
        runtime = RuntimeDir.default()
        if requested == vsock.EMULATED:
            runtime.ensure()
            environ[vsock.ENV_DIR] = str(runtime.vsock_root)
        elif requested == vsock.AUTO and runtime.vsock_root.is_dir():
            environ[vsock.ENV_DIR] = str(runtime.vsock_root)
    return vsock.VsockConfig.from_env(environ)
