"""Command resolution, customer ramdisk layout and boot profiles."""

from __future__ import annotations

import json
import stat

import pytest

from qtbuild.convert.boot_profiles import blobs_profile, kernel_arch, local_profile
from qtbuild.convert.launch_config import resolve_launch, tree_file_reader
from qtbuild.convert.ramdisk import customer_ramdisk
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioEntry, iter_archive
from qtbuild.formats.launch_record import DEFAULT_PATH
from qtbuild.formats.local_abi import parse_local_kernel

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:app,other\n"


def files(**contents: bytes):
    entries = {
        path.lstrip("/").encode(): CpioEntry(path.lstrip("/").encode(), stat.S_IFREG | 0o644, size=len(data), data=data)
        for path, data in contents.items()
    }
    return tree_file_reader(entries)


ACCOUNTS = files(**{"/etc/passwd": PASSWD, "/etc/group": GROUP})


def config(**container) -> dict:
    return {"architecture": "amd64", "os": "linux", "config": container}


def test_oci_semantics_joins_entrypoint_and_cmd():
    launch = resolve_launch(config(Entrypoint=["/app"], Cmd=["--flag"], Env=["A=1"]), ACCOUNTS)
    assert launch.argv == ["/app", "--flag"]
    assert launch.env == [f"PATH={DEFAULT_PATH}", "A=1"]


def test_nitro_semantics_cmd_else_entrypoint():
    assert resolve_launch(config(Entrypoint=["/app"], Cmd=["--flag"]), ACCOUNTS, semantics="nitro").argv == ["--flag"]
    assert resolve_launch(config(Entrypoint=["/app"]), ACCOUNTS, semantics="nitro").argv == ["/app"]


def test_no_command_is_an_error_with_a_hint():
    with pytest.raises(ImageError, match="CMD"):
        resolve_launch(config(Env=["PATH=/bin"]), ACCOUNTS)


def test_newline_in_argv_is_refused():
    with pytest.raises(ImageError, match="newline"):
        resolve_launch(config(Cmd=["/app", "two\nlines"]), ACCOUNTS)


@pytest.mark.parametrize(
    "user, expected",
    [("", (0, 0, [], "root")), ("app", (1000, 1000, [50], "app")), ("1000", (1000, 1000, [50], "app")),
     ("app:staff", (1000, 50, [], "app")), ("4242", (4242, 0, [], "4242")), ("4242:7", (4242, 7, [], "4242"))],
)
def test_user_resolution(user, expected):
    launch = resolve_launch(config(Cmd=["/app"], User=user, WorkingDir="/srv/"), ACCOUNTS)
    assert (launch.uid, launch.gid, launch.groups, launch.user) == expected
    assert launch.cwd == "/srv"


@pytest.mark.parametrize("user", ["nobody", "app:nogroup"])
def test_unknown_user_or_group_is_an_error(user):
    with pytest.raises(ImageError, match="no (user|group)"):
        resolve_launch(config(Cmd=["/app"], User=user), ACCOUNTS)


def test_customer_ramdisk_layout():
    launch = resolve_launch(config(Cmd=["/bin/app", "x"], Env=["PATH=/bin", "A=b"]), ACCOUNTS)
    image = [CpioEntry(b"bin", stat.S_IFDIR | 0o755), CpioEntry(b"bin/app", stat.S_IFREG | 0o755, size=2, data=b"hi"),
             CpioEntry(b"tmp", stat.S_IFDIR | 0o700)]
    archive = customer_ramdisk(image, launch)
    data = b"".join(archive.chunks())
    assert len(data) == archive.size
    import io

    members = {}
    for member, payload in iter_archive(io.BytesIO(data)):
        members[member.path] = (member.mode, payload.read())
    assert members[b"cmd"][1] == b"/bin/app\nx\n"
    assert members[b"env"][1] == b"PATH=/bin\nA=b\n"
    assert json.loads(members[b"launch.json"][1])["argv"] == ["/bin/app", "x"]
    assert members[b"rootfs/bin/app"][1] == b"hi"
    assert stat.S_IMODE(members[b"rootfs/tmp"][0]) == 0o700  # the image's own mount point is kept
    assert stat.S_IMODE(members[b"rootfs/proc"][0]) == 0o555
    assert {b"rootfs/dev", b"rootfs/run", b"rootfs/sys", b"rootfs/var"} <= set(members)


def test_local_profile_is_recognisable_and_deterministic():
    profile = local_profile("amd64")
    assert profile.arch == "x86_64"
    assert parse_local_kernel(profile.kernel)["arch"] == "x86_64"
    assert b"".join(profile.bootstrap.chunks()) == b"".join(local_profile("x86_64").bootstrap.chunks())
    assert parse_local_kernel(b"MZ\x00real kernel") is None


def bzimage() -> bytes:
    return b"\0" * 0x202 + b"HdrS" + b"\0" * 100


def arm64_image() -> bytes:
    return b"\0" * 56 + b"ARM\x64" + b"\0" * 100


def test_kernel_arch_detection():
    assert kernel_arch(bzimage()) == "x86_64" and kernel_arch(arm64_image()) == "aarch64" and kernel_arch(b"x") is None


def test_blobs_profile(tmp_path):
    (tmp_path / "bzImage").write_bytes(bzimage())
    (tmp_path / "cmdline").write_text("console=ttyS0 custom\n")
    (tmp_path / "init").write_bytes(b"\x7fELF init")
    (tmp_path / "nsm.ko").write_bytes(b"\x7fELF module")
    profile = blobs_profile(tmp_path, "amd64")
    assert profile.cmdline == "console=ttyS0 custom"
    import io

    names = {m.path: stat.S_IMODE(m.mode) for m, _ in iter_archive(io.BytesIO(b"".join(profile.bootstrap.chunks())))}
    assert names == {b"dev": 0o755, b"init": 0o755, b"nsm.ko": 0o644}


def test_blobs_architecture_mismatch_is_refused(tmp_path):
    (tmp_path / "bzImage").write_bytes(bzimage())
    (tmp_path / "init").write_bytes(b"init")
    with pytest.raises(ImageError, match="other architecture"):
        blobs_profile(tmp_path, "arm64")
    (tmp_path / "Image").write_bytes(bzimage())  # an x86 kernel named like an arm64 one
    with pytest.raises(ImageError, match="is x86_64 but the image is aarch64"):
        blobs_profile(tmp_path, "arm64")


def test_blobs_without_init_is_refused(tmp_path):
    (tmp_path / "bzImage").write_bytes(bzimage())
    with pytest.raises(ImageError, match="init"):
        blobs_profile(tmp_path, "amd64")


def test_source_kind_prefixes_a_bare_source():
    from qtbuild.sources.open import with_source_kind

    assert with_source_kind("127.0.0.1:5000/app:v1", "registry") == "registry://127.0.0.1:5000/app:v1"
    assert with_source_kind("app.tar", "archive") == "docker-archive:app.tar"
    assert with_source_kind("oci:dir", "oci") == "oci:dir"
    assert with_source_kind("hello:v1", None) == "hello:v1"
    with pytest.raises(ImageError, match="does not match"):
        with_source_kind("docker://hello", "oci")
