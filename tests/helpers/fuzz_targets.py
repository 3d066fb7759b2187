"""The fuzz targets: every parser of untrusted input, each behind ``run(data: bytes)``.

A target feeds the bytes to the parser's public entry point and lets exactly the parser's typed
errors through (``typed``); anything else — IndexError, KeyError, a bare ValueError,
RecursionError, OverflowError, UnicodeDecodeError... — is a crash.  Used by the coverage-guided
runner (:mod:`helpers.fuzz_run`, ``scripts/fuzz.sh``) and by tests/build/test_fuzz.py, which
replays the seeds and every stored regression input (tests/corpus/fuzz/<target>/).
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import cbor2

from qtbuild.convert.flatten import flatten
from qtbuild.convert.launch_config import resolve_launch
from qtbuild.convert.tarscan import ByteBudget, TarFormatError, TarLimits, TarScanner
from qtbuild.errors import ImageError
from qtbuild.formats.attestation import ModuleError, decode_request, decode_response, encode_response, read_document
from qtbuild.formats.cose import decode_sign1
from qtbuild.formats.cpio import CpioArchive, CpioEntry, iter_archive
from qtbuild.formats.eif import EifReader
from qtbuild.formats.eif_metadata import parse_metadata
from qtbuild.formats.eif_signature import load_signature
from qtbuild.formats.errors import FormatError, SignatureError
from qtbuild.formats.launch_record import parse_cmd_env, parse_launch_json
from qtbuild.formats.local_abi import make_local_kernel, parse_local_kernel
from qtbuild.inspect.describe import describe_eif
from qtbuild.runtime.proxy import ProxyConfigError, parse_config
from qtbuild.runtime.verifier.attestation import AttestationError, verify_document
from qtbuild.sources.auth import parse_challenges
from qtbuild.sources.base import Layer, parse_json_document
from qtbuild.sources.select import Descriptor, parse_index, parse_manifest

TESTS = Path(__file__).resolve().parents[1]
CORPUS = TESTS / "corpus"
FUZZ_CORPUS = CORPUS / "fuzz"


@dataclass(frozen=True)
class Target:
    """One parser: ``run`` may raise only ``typed`` exceptions; ``seeds`` are valid-ish inputs."""

    name: str
    run: Callable[[bytes], object]
    typed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]


# -- formats -----------------------------------------------------------------------------------


def _eif(data: bytes) -> None:
    describe_eif(EifReader.from_bytes(data))


def _cpio(data: bytes) -> None:
    for _member, content in iter_archive(io.BytesIO(data), archive_size=len(data), max_entries=10_000):
        if content is not None:
            content.read() if hasattr(content, "read") else bytes(content)


def _cpio_seed() -> bytes:
    archive = CpioArchive([
        CpioEntry(b"d", stat.S_IFDIR | 0o755), CpioEntry(b"d/f", stat.S_IFREG | 0o644, size=3, data=b"abc"),
        CpioEntry(b"d/l", stat.S_IFLNK | 0o777, link_target=b"f"),
        CpioEntry(b"d/h1", stat.S_IFREG | 0o600, size=2, data=b"hi", hardlink_key=1),
        CpioEntry(b"d/h2", stat.S_IFREG | 0o600, size=2, data=b"hi", hardlink_key=1),
        CpioEntry(b"dev", stat.S_IFCHR | 0o600, rdev=(1, 3)),
    ])
    return b"".join(archive.chunks())


def _corpus_files(sub: str, suffix: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted((CORPUS / sub).glob(f"*{suffix}"))]


def _attestation_seed() -> bytes:
    return base64.b64decode((TESTS / "fixtures" / "nitro-attestation-2026-02.cose.b64").read_text())


def _attestation(data: bytes) -> None:
    read_document(data)


def _signature_section_seeds() -> list[bytes]:
    seeds = []
    for data in _corpus_files("eifs", ".eif"):
        try:
            reader = EifReader.from_bytes(data)
            if reader.signature_section is not None:
                seeds.append(reader.read_section(reader.signature_section, max_size=1 << 16))
        except FormatError:
            pass
    return seeds


_ATTESTED_AT = datetime(2026, 2, 6, 9, 0, tzinfo=UTC)  # inside the fixture's leaf validity


def _attestation_verify(data: bytes) -> None:
    """The whole verifier (envelope, syntax, chain to the pinned AWS root, signature) on a document."""
    verify_document(data, root_fingerprints=[NITRO_ROOT_SHA256], platform="auto", at=_ATTESTED_AT)


NITRO_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"


def _proxy_config(data: bytes) -> None:
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    parse_config(document)


def _launch(data: bytes) -> None:
    parse_launch_json(data)
    cmd, _, env = data.partition(b"\0")
    parse_cmd_env(cmd, env)


def _qtsm_messages(data: bytes) -> None:
    decode_request(data)


# -- build side --------------------------------------------------------------------------------


class _BytesLayer(Layer):
    def __init__(self, tar: bytes):
        self.diff_id = "sha256:" + "0" * 64
        self.descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar", self.diff_id, len(tar))
        self._tar = tar

    def open_blob(self):
        return io.BytesIO(self._tar)

    def open_uncompressed(self):
        return io.BytesIO(self._tar)

    def range_opener(self):
        return lambda offset, size: io.BytesIO(self._tar[offset:offset + size])


def _tar(data: bytes) -> None:
    scanner = TarScanner(io.BytesIO(data), limits=TarLimits(max_long_name=8 << 10, max_pax_header=1 << 16),
                         budget=ByteBudget(1 << 24))
    for _member in scanner:
        pass
    scanner.drain()


def _flatten(data: bytes) -> None:
    """The layer applied twice: replacement and whiteouts across layers get exercised too."""
    with flatten([_BytesLayer(data), _BytesLayer(data)]) as tree:
        for entry in tree.entries():
            if entry.data is not None and callable(entry.data):
                with entry.data() as handle:
                    handle.read(1 << 16)


@cache
def _tar_seeds() -> list[bytes]:
    import tarfile

    seeds = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
            def add(name, kind=tarfile.REGTYPE, data=b"", link=""):
                info = tarfile.TarInfo(name)
                info.type, info.size, info.linkname = kind, len(data), link
                archive.addfile(info, io.BytesIO(data) if data else None)
            add("etc", tarfile.DIRTYPE)
            add("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")
            add("etc/link", tarfile.SYMTYPE, link="passwd")
            add("etc/hard", tarfile.LNKTYPE, link="etc/passwd")
            add("etc/.wh.gone")
            add("a/.wh..wh..opq")
            add("x" * 120 + "/long", data=b"long name")
            add("dev", tarfile.CHRTYPE)
        seeds.append(out.getvalue())
    return seeds


def _config(data: bytes) -> None:
    parse_json_document(data, "image config")


def _manifest(data: bytes) -> None:
    parse_manifest(data)


def _index(data: bytes) -> None:
    parse_index(data)


_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "a" * 64, "size": 2},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "b" * 64,
                "size": 10}]}).encode()
_INDEX = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "c" * 64,
                   "size": 5, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                   "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}).encode()


def _accounts(data: bytes) -> None:
    """``User`` spec, /etc/passwd and /etc/group, separated by NUL bytes."""
    user, _, rest = data.partition(b"\0")
    passwd, _, group = rest.partition(b"\0")
    files = {"/etc/passwd": passwd, "/etc/group": group}
    config = {"config": {"Cmd": ["/app"], "User": user.decode("utf-8", "replace")}}
    resolve_launch(config, files.get)


_ACCOUNTS = (b"app:staff\0root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
             b"\0root:x:0:\nstaff:x:50:app,other\napp:x:1000:\n")


def _docker_archive(data: bytes) -> None:
    from qtbuild.sources.open import open_image

    with tempfile.TemporaryDirectory(prefix="qtbuild-fuzz-") as directory:
        path = os.path.join(directory, "image.tar")
        with open(path, "wb") as handle:
            handle.write(data)
        with open_image(f"docker-archive:{path}", platform=None) as image:
            image.config()
            for layer in image.layers():
                with layer.open_uncompressed() as stream:
                    stream.read(1 << 16)


def _auth_headers(data: bytes) -> None:
    parse_challenges(data.decode("latin-1").split("\n"))


_AUTH = (b'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
         b'scope="repository:app:pull"\nBasic realm="x"\nBearer realm="https://a/t",error="insufficient_scope"')


def _local_abi(data: bytes) -> None:
    parse_local_kernel(data)


TARGETS: dict[str, Target] = {target.name: target for target in [
    Target("eif", _eif, (FormatError, SignatureError), lambda: _corpus_files("eifs", ".eif")),
    Target("eif_metadata", parse_metadata, (FormatError,),
           lambda: [b'{"ImageName":"a","ImageVersion":"b","BuildMetadata":{"BuildTime":"x"},"DockerInfo":{},'
                    b'"CustomMetadata":{"k":[1,2.5,null,true,"\\u00e9"]}}']),
    Target("eif_signature", load_signature, (FormatError,), _signature_section_seeds),
    Target("cose_sign1", decode_sign1, (FormatError,), lambda: [_attestation_seed()]),
    Target("attestation_document", _attestation, (FormatError,), lambda: [_attestation_seed()]),
    Target("qtsm_request", _qtsm_messages, (FormatError, ModuleError),
           lambda: [cbor2.dumps({"Attestation": {"nonce": b"n", "public_key": None, "user_data": b"u"}}),
                    cbor2.dumps({"DescribePCR": {"index": 3}}), cbor2.dumps({"ExtendPCR": {"index": 16, "data": b"x"}}),
                    cbor2.dumps({"LockPCRs": {"range": 4}}), cbor2.dumps("DescribeNSM")]),
    Target("qtsm_response", decode_response, (FormatError, ModuleError),
           lambda: [encode_response("Attestation", {"document": b"\x01\x02"}), cbor2.dumps({"Error": "InvalidIndex"}),
                    encode_response("DescribePCR", {"lock": False, "data": b"\0" * 48})]),
    Target("cpio", _cpio, (FormatError,), lambda: [_cpio_seed()]),
    Target("launch_record", _launch, (FormatError,),
           lambda: [b'{"argv":["/app"],"cwd":"/","env":["PATH=/bin"],"gid":0,"groups":[],"uid":0,"user":"root"}\n',
                    b"/app\n--flag\n\0PATH=/bin\nA=1\n"]),
    Target("local_abi", _local_abi, (FormatError,), lambda: [make_local_kernel("x86_64")]),
    Target("tar", _tar, (TarFormatError,), _tar_seeds),
    Target("flatten", _flatten, (ImageError,), _tar_seeds),
    Target("image_config", _config, (ImageError,),
           lambda: [json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/a"]},
                                "rootfs": {"type": "layers", "diff_ids": []}}).encode()]),
    Target("image_manifest", _manifest, (ImageError,), lambda: [_MANIFEST]),
    Target("image_index", _index, (ImageError,), lambda: [_INDEX]),
    Target("accounts", _accounts, (ImageError,), lambda: [_ACCOUNTS]),
    Target("docker_archive", _docker_archive, (ImageError,),
           lambda: [p for p in _corpus_files("images", ".tar") if len(p) < 64 << 10][:6]),
    Target("auth_headers", _auth_headers, (ImageError,), lambda: [_AUTH]),
    Target("attestation_verify", _attestation_verify, (AttestationError,), lambda: [_attestation_seed()]),
    Target("proxy_config", _proxy_config, (ProxyConfigError,), lambda: [
        b'max_connections = 64\nidle_timeout = 30\n[[routes]]\nvsock_port = 8000\nhost = "kms.example.com"\n'
        b'port = 443\n[[routes]]\nvsock_port = 8001\nhost = "127.0.0.1"\nport = 9000\n']),
]}


def regression_inputs(name: str) -> list[Path]:
    """Stored inputs for ``name`` (crashers found earlier, now fixed), sorted."""
    directory = FUZZ_CORPUS / name
    return sorted(directory.iterdir()) if directory.is_dir() else []
