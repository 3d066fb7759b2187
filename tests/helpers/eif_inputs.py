"""Inputs for building small EIFs in tests: kernel, ramdisks (valid or hostile), signing key."""

from __future__ import annotations

import stat

from cryptography.hazmat.primitives import serialization

from qtbuild.formats.cpio import CpioArchive, CpioEntry

from .certs import make_signer


def newc(entries: list[tuple[bytes, int, bytes]]) -> bytes:
    """A hand-made newc archive (no validation: used for hostile input)."""
    out = b""
    for ino, (name, mode, data) in enumerate(entries + [(b"TRAILER!!!", 0, b"")], start=1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out


def customer_ramdisk(app: bytes = b"hello", extra: tuple[CpioEntry, ...] = ()) -> bytes:
    """A small customer ramdisk: rootfs with a setuid app, a symlink, a device node, and cmd."""
    archive = CpioArchive([
        CpioEntry(b"rootfs", stat.S_IFDIR | 0o755),
        CpioEntry(b"rootfs/bin", stat.S_IFDIR | 0o755),
        CpioEntry(b"rootfs/bin/app", stat.S_IFREG | 0o4755, size=len(app), data=app),
        *extra,
        CpioEntry(b"rootfs/bin/link", stat.S_IFLNK | 0o777, link_target=b"/bin/app"),
        CpioEntry(b"rootfs/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry(b"cmd", stat.S_IFREG | 0o644, size=9, data=b"/bin/app\n"),
    ])
    return b"".join(archive.chunks())


def write_inputs(tmp_path):
    """kernel, bootstrap and customer ramdisks, key and certificate on disk, in ``tmp_path``."""
    (tmp_path / "kernel").write_bytes(b"KERNEL" * 100)
    (tmp_path / "boot.cpio").write_bytes(newc([(b"init", stat.S_IFREG | 0o755, b"#!init")]))
    (tmp_path / "app.cpio").write_bytes(customer_ramdisk())
    key, cert_pem = make_signer("P-384")
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    return tmp_path
