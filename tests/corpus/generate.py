"""Regenerate the hostile image/EIF corpus in this directory (``images/``, ``eifs/``, ``cases.json``).

Run from the repository root: ``PYTHONPATH=tests .venv/bin/python -P tests/corpus/generate.py``.
Each case is one small file and the CLI command expected to refuse it: exit code, and a fragment
of the one-line error.  ``tests/build/test_corpus.py`` replays every case through the real CLI.
The files are committed, so the test does not depend on this script (signatures are randomised,
so a rerun changes the signed EIFs' bytes but not the expectations).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import struct
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.formats.cose import sign1
from qtbuild.formats.eif_signature import encode_signature_section, pcr_info_payload
from qtbuild.formats.eif_writer import write_eif

from helpers.eif_inputs import customer_ramdisk, newc
from helpers.imagefactory import default_config, directory, file, make_layer, symlink, write_docker_archive

HERE = Path(__file__).resolve().parent
BASE = [directory("bin"), file("bin/app", b"#!/bin/sh\necho hi\n", mode=0o755), directory("etc"),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n"),
        file("etc/group", b"root:x:0:\napp:x:1000:\n")]


def nested(depth: int) -> dict:
    value: dict = {"leaf": "x"}
    for _ in range(depth):
        value = {"n": value}
    return value


def image(name: str, *, layers: list[bytes] | None = None, created: str | None = None, labels: object = None,
          **config_args) -> str:
    config = default_config(**({"cmd": ["/bin/app"]} | config_args))
    if created is not None:
        config["created"] = created
    if labels is not None:
        config["config"]["Labels"] = labels
    path = HERE / "images" / f"{name}.tar"
    write_docker_archive(path, layers or [make_layer(BASE)], config)
    return f"images/{name}.tar"


def raw_tar(*members: bytes) -> bytes:
    return b"".join(members) + bytes(1024)


def header(name: bytes, size: int = 0, typeflag: bytes = b"0", linkname: bytes = b"") -> bytes:
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108], block[108:116], block[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 0
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def odd_issuer_certificate(key: ec.EllipticCurvePrivateKey, tag: int) -> bytes:
    """A self-signed certificate (valid 2000-9999) whose issuer CN uses ASN.1 string ``tag``."""
    marker = "corpus-odd-issuer"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, marker)])
    der = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(datetime(2000, 1, 1, tzinfo=UTC))
           .not_valid_after(datetime(9999, 12, 31, tzinfo=UTC)).sign(key, hashes.SHA384())
           .public_bytes(serialization.Encoding.DER))
    utf8 = b"\x0c" + bytes([len(marker)]) + marker.encode()
    certificate = asn1_x509.Certificate.load(der.replace(utf8, bytes([tag]) + utf8[1:], 1))
    tbs = certificate["tbs_certificate"].dump()
    certificate["signature_value"] = key.sign(tbs, ec.ECDSA(hashes.SHA384()))
    return _pem(certificate.dump())


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


class RawSigner:
    """Signs PCR0 with ``key`` and stores ``certificate_pem`` as is (no checks on the certificate)."""

    def __init__(self, key, certificate_pem: bytes):
        self.key, self.pem = key, certificate_pem
        self.certificate_der = hashlib.sha384(certificate_pem).digest()  # only used for PCR8

    def signature_section(self, pcr0: bytes) -> bytes:
        return encode_signature_section([(self.pem, sign1(pcr_info_payload(0, pcr0), self.key))])


def eif(name: str, *, app: bytes | None = None, signer=None, metadata: bytes | None = None) -> str:
    path = HERE / "eifs" / f"{name}.eif"
    write_eif(path, kernel=b"KERNEL" * 10, cmdline="console=ttyS0",
              ramdisks=[newc([(b"init", stat.S_IFREG | 0o755, b"#!init")]), app or customer_ramdisk()],
              metadata=metadata if metadata is not None else b'{"ImageName":"x"}', signer=signer)
    return f"eifs/{name}.eif"


def patched(name: str, source: str, edit) -> str:
    data = bytearray((HERE / source).read_bytes())
    edit(data)
    (HERE / "eifs" / f"{name}.eif").write_bytes(bytes(data))
    return f"eifs/{name}.eif"


def archive(name: str, members: dict[str, bytes], *, truncate: int | None = None) -> str:
    """A docker-archive tar of ``members`` (name -> bytes), written as is (hostile layouts)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = out.getvalue()
    (HERE / "images" / f"{name}.tar").write_bytes(data[:truncate] if truncate else data)
    return f"images/{name}.tar"


def legacy(name: str, config: bytes, layers: dict[str, bytes], manifest: object = None, **kwargs) -> str:
    entries = {"config.json": config, **layers}
    if manifest is None:
        manifest = [{"Config": "config.json", "RepoTags": ["x:1"], "Layers": list(layers)}]
    entries["manifest.json"] = json.dumps(manifest).encode()
    return archive(name, entries, **kwargs)


def config_for(*layers: bytes) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
                       "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()
                                                                 for layer in layers]}}).encode()


def pax(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for key, value in records.items():
        line = b" " + key + b"=" + value + b"\n"
        length = len(line) + 1
        while length != len(line) + len(str(length)):
            length = len(line) + len(str(length))
        body += str(length).encode() + line
    return header(b"PaxHeader", len(body), b"x") + body + bytes(-len(body) % 512)


def convert(path: str, fragment: str) -> dict:
    return {"input": path, "command": ["convert", "docker-archive:{input}", "-o", "{out}/app.eif"], "exit": 2,
            "stderr": fragment}


def command(name: str, path: str, fragment: str, exit_code: int = 2, *extra: str) -> dict:
    args = [name, "{input}", *extra]
    if name == "extract":
        args += ["-o", "{out}/extracted"]
    return {"input": path, "command": args, "exit": exit_code, "stderr": fragment}


def main() -> None:
    for sub in ("images", "eifs"):
        (HERE / sub).mkdir(exist_ok=True)
        for old in (HERE / sub).iterdir():
            old.unlink()
    cases: dict[str, dict] = {}
    # -- images: launch configuration ("Why" 7 of issue 12)
    cases["created-near-date-limit"] = convert(image("created-near-date-limit", created="0001-01-01T00:00:00+01:00"),
                                               "outside the dates UTC can represent")
    cases["passwd-non-numeric-gid"] = convert(image("passwd-non-numeric-gid", user="app", layers=[make_layer(
        [directory("bin"), file("bin/app", b"x", mode=0o755), directory("etc"),
         file("etc/passwd", b"app:x:1000:staff::/:/bin/sh\n")])]), "not a number")
    cases["user-unicode-digits"] = convert(image("user-unicode-digits", user="\u00b2"), "no user '²'")
    cases["group-unicode-digits"] = convert(image("group-unicode-digits", user="0:\u0663"), "no group")
    cases["uid-2-pow-64"] = convert(image("uid-2-pow-64", user=str(2**64)), "uid 18446744073709551616 is outside")
    cases["gid-2-pow-32"] = convert(image("gid-2-pow-32", user=f"0:{2**32}"), "gid 4294967296 is outside")
    cases["workdir-nul"] = convert(image("workdir-nul", workdir="/srv\0x"), "WorkingDir")
    cases["env-without-equals"] = convert(image("env-without-equals", env=["JUSTANAME"]), "not NAME=value")
    cases["argv-nul"] = convert(image("argv-nul", cmd=["/bin/app", "a\0b"]), "newline or NUL")
    cases["argv0-empty"] = convert(image("argv0-empty", cmd=[""]), "program (first element) is empty")
    cases["labels-65-deep"] = convert(image("labels-65-deep", labels=nested(66)), "nests deeper than 64")
    cases["labels-200-deep"] = convert(image("labels-200-deep", labels=nested(200)), "")
    cases["no-command"] = convert(image("no-command", cmd=None), "no command")
    # -- images: layers
    cases["member-dotdot"] = convert(image("member-dotdot", layers=[raw_tar(header(b"../escape", 0))]),
                                     "'..' component")
    cases["member-absolute"] = convert(image("member-absolute", layers=[raw_tar(header(b"/etc/x", 0))]), "absolute")
    cases["hardlink-missing"] = convert(image("hardlink-missing", layers=[raw_tar(header(b"a", 0, b"1", b"nothere"))]),
                                        "does not exist")
    cases["symlink-loop-parent"] = convert(image("symlink-loop-parent", layers=[make_layer(
        [symlink("a", "b"), symlink("b", "a"), file("a/x", b"x")])]), "too many levels of symbolic links")
    cases["bare-whiteout"] = convert(image("bare-whiteout", layers=[raw_tar(header(b".wh.", 0))]), "bare whiteout")
    cases["truncated-layer"] = convert(image("truncated-layer", layers=[header(b"f", 5000) + b"x" * 100]), "layer 1")
    bad_checksum = bytearray(header(b"f", 0))
    bad_checksum[148:156] = b"0000000\0"
    cases["tar-bad-checksum"] = convert(image("tar-bad-checksum", layers=[raw_tar(bytes(bad_checksum))]), "checksum")
    # -- images: archives and documents
    layer = raw_tar(header(b"bin/app", 0))
    cases["archive-manifest-not-json"] = convert(archive("archive-manifest-not-json", {"manifest.json": b"[{"}),
                                                 "not valid JSON")
    cases["archive-manifest-not-list"] = convert(archive("archive-manifest-not-list", {"manifest.json": b"{}"}), "")
    cases["archive-missing-config"] = convert(legacy("archive-missing-config", b"", {"l.tar": layer},
                                                     manifest=[{"Config": "nope.json", "Layers": ["l.tar"]}]), "")
    cases["archive-config-not-json"] = convert(legacy("archive-config-not-json", b"{not json", {"l.tar": layer}), "")
    cases["archive-config-deep"] = convert(legacy("archive-config-deep", b"[" * 100_000 + b"]" * 100_000,
                                                  {"l.tar": layer}), "")
    cases["archive-diff-id-mismatch"] = convert(legacy("archive-diff-id-mismatch", config_for(b"other"),
                                                       {"l.tar": layer}), "")
    cases["archive-layer-escapes"] = convert(legacy("archive-layer-escapes", config_for(layer), {"l.tar": layer},
                                                    manifest=[{"Config": "config.json", "Layers": ["../l.tar"]}]), "")
    cases["archive-truncated"] = convert(legacy("archive-truncated", config_for(layer), {"l.tar": layer},
                                                truncate=1500), "")
    cases["archive-config-arch-object"] = convert(legacy("archive-config-arch-object", json.dumps(
        {"architecture": {"x": 1}, "os": "linux", "config": {"Cmd": ["/a"]},
         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode(),
        {"l.tar": layer}), "")
    cases["archive-config-cmd-not-list"] = convert(legacy("archive-config-cmd-not-list", json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Cmd": "/bin/app", "Env": {"A": 1}},
         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode(),
        {"l.tar": layer}), "")
    for label, tar in {
        "pax-size-huge": raw_tar(pax({b"size": b"9" * 30}), header(b"f", 0)),
        "pax-path-nul": raw_tar(pax({b"path": b"a\0b"}), header(b"a", 0)),
        "pax-header-huge": raw_tar(header(b"PaxHeader", 1 << 30, b"x")),
        "gnu-longname-huge": raw_tar(header(b"././@LongLink", 1 << 20, b"L")),
        "component-over-255": raw_tar(pax({b"path": b"a" * 300}), header(b"x", 0)),
        "hardlink-to-directory": raw_tar(header(b"d", 0, b"5"), header(b"h", 0, b"1", b"d")),
        "whiteout-dotdot": raw_tar(header(b"d", 0, b"5"), header(b"d/.wh..", 0)),
        "symlink-empty-target": raw_tar(header(b"s", 0, b"2", b"")),
        "size-field-garbage": raw_tar(header(b"f", 0)[:124] + b"zzzzzzzzzzz\0" + header(b"f", 0)[136:]),
    }.items():
        cases[f"layer-{label}"] = convert(legacy(f"layer-{label}", config_for(tar), {"l.tar": tar}), "layer 1")
    # -- EIFs
    eif("valid")
    cases["eif-crc-mismatch"] = command("verify", patched("eif-crc-mismatch", "eifs/valid.eif",
                                                          lambda d: d.__setitem__(565, d[565] ^ 0xFF)), "crc", 1)
    cases["eif-version-99"] = command("describe", patched("eif-version-99", "eifs/valid.eif",
                                                          lambda d: d.__setitem__(slice(4, 6), b"\x00\x63")), "version")
    cases["eif-unknown-section-type"] = command("describe", patched(
        "eif-unknown-section-type", "eifs/valid.eif", lambda d: d.__setitem__(slice(548, 550), b"\x00\x77")), "")
    cases["eif-section-size-huge"] = command("extract", patched(
        "eif-section-size-huge", "eifs/valid.eif", lambda d: d.__setitem__(slice(552, 560), b"\x7f" + b"\xff" * 7)), "")
    cases["eif-empty"] = command("verify", patched("eif-empty", "eifs/valid.eif", lambda d: d.clear()), "")
    cases["eif-bad-magic"] = command("describe", patched("eif-bad-magic", "eifs/valid.eif",
                                                         lambda d: d.__setitem__(slice(0, 4), b"EIF.")), "magic")
    cases["eif-truncated"] = command("verify", patched("eif-truncated", "eifs/valid.eif",
                                                       lambda d: d.__delitem__(slice(300, None))), "")
    cases["eif-section-past-end"] = command("describe", patched(
        "eif-section-past-end", "eifs/valid.eif", lambda d: d.__setitem__(slice(len(d) - 4, None), b"")), "")
    cases["eif-num-sections-huge"] = command("describe", patched(
        "eif-num-sections-huge", "eifs/valid.eif",
        lambda d: d.__setitem__(slice(26, 28), struct.pack(">H", 65535))), "")
    cases["eif-ramdisk-dotdot"] = command("extract", eif("eif-ramdisk-dotdot", app=newc(
        [(b"../escape", stat.S_IFREG | 0o644, b"pwned")])), "..")
    cases["eif-ramdisk-absolute"] = command("extract", eif("eif-ramdisk-absolute", app=newc(
        [(b"/etc/evil", stat.S_IFREG | 0o644, b"pwned")])), "absolute")
    cases["eif-ramdisk-truncated"] = command("extract", eif("eif-ramdisk-truncated", app=newc(
        [(b"a", stat.S_IFREG | 0o644, b"x" * 64)])[:150]), "")
    key = ec.generate_private_key(ec.SECP384R1())
    for tag, label in ((0x15, "videotex"), (0x1B, "general")):
        path = eif(f"eif-issuer-{label}-string", signer=RawSigner(key, odd_issuer_certificate(key, tag)))
        cases[f"eif-issuer-{label}-string"] = command("verify", path, "signing certificate: cannot parse", 1)
        cases[f"eif-issuer-{label}-string-describe"] = command("describe", path, '"SignatureError": "signature section '
                                                               'is malformed: signing certificate: cannot parse', 0)
    cases["eif-signature-garbage"] = command("verify", patched(
        "eif-signature-garbage", "eifs/eif-issuer-general-string.eif",
        lambda d: d.__setitem__(slice(len(d) - 40, len(d) - 20), b"\xff" * 20)), "", 1)
    cases["eif-metadata-deep"] = command("describe", eif("eif-metadata-deep", metadata=(
        '{"ImageName":"x","CustomMetadata":' + json.dumps(nested(100)) + "}").encode()),
        '"MetadataError": "metadata nests deeper than 64 levels"', 0)
    (HERE / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
