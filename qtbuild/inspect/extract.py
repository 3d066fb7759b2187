"""`qtbuild extract`: write an EIF's sections to a directory, ramdisks also safely unpacked.

Layout of the output directory::

    kernel                  kernel section, raw
    cmdline                 kernel command line, raw
    metadata.json           metadata section, raw (absent if the image has none)
    signature.cbor          signature section, raw (signed images only)
    signing-certificate.pem the certificate stored in the signature (signed images only)
    ramdiskN.cpio           each ramdisk section, raw
    ramdiskN/               each ramdisk unpacked with the safe cpio reader: no path escapes,
                            no device nodes created, setuid bits stripped, setgid bits kept;
                            owners kept when run as root (else ``owners_kept`` is false)
    report.json             what was extracted, skipped or stripped

The directory appears atomically: everything is written to a temporary sibling, renamed into
place at the end, and removed on any error.  An existing non-empty directory is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import asdict

from qtbuild.formats.eif import MAX_SIGNATURE_SIZE, EifReader, Section, SectionType
from qtbuild.formats.eif_signature import decode_signature_section
from qtbuild.formats.errors import FormatError
from qtbuild.runtime.unpack import unpack_archive

CPIO_MAGICS = (b"070701", b"070702")


class ExtractError(Exception):
    """The output directory cannot be used (exists and is not empty, or cannot be created)."""


def extract_eif(reader: EifReader, output_dir: str | os.PathLike, *, unpack: bool = True) -> dict:
    """Extract ``reader``'s image into ``output_dir`` (atomically); returns the report."""
    target = os.path.abspath(os.fspath(output_dir))
    _check_target(target)
    parent = os.path.dirname(target)
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=parent)
    try:
        report = _extract_into(reader, staging, unpack)
        _write_json(os.path.join(staging, "report.json"), report)
        os.chmod(staging, _mode_after_umask(staging, 0o755))
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        os.rename(staging, target)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_target(target: str) -> None:
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise ExtractError(f"{target} exists and is not a directory: choose a new output directory")
        if os.listdir(target):
            raise ExtractError(f"{target} is not empty: choose a new or empty output directory")
    elif not os.path.isdir(os.path.dirname(target)):
        raise ExtractError(f"the parent directory of {target} does not exist")


def _extract_into(reader: EifReader, staging: str, unpack: bool) -> dict:
    report: dict = {"files": [], "ramdisks": []}
    names = {SectionType.KERNEL: "kernel", SectionType.CMDLINE: "cmdline", SectionType.METADATA: "metadata.json",
             SectionType.SIGNATURE: "signature.cbor"}
    for ramdisk_index, section in enumerate(reader.ramdisks):
        name = f"ramdisk{ramdisk_index}"
        _copy_section(reader, section, os.path.join(staging, name + ".cpio"))
        report["files"].append(name + ".cpio")
        if unpack:
            report["ramdisks"].append(_unpack_ramdisk(reader, section, os.path.join(staging, name), name))
    for section in reader.sections:
        if section.type in names:
            _copy_section(reader, section, os.path.join(staging, names[section.type]))
            report["files"].append(names[section.type])
    if reader.signature_section is not None:
        raw = reader.read_section(reader.signature_section, max_size=MAX_SIGNATURE_SIZE)
        try:
            certificate_pem = decode_signature_section(raw)[0][0]
        except FormatError as exc:
            report["signature_problem"] = str(exc)
        else:
            with open(os.path.join(staging, "signing-certificate.pem"), "wb") as handle:
                handle.write(certificate_pem)
            report["files"].append("signing-certificate.pem")
    report["files"].sort()
    return report


def _copy_section(reader: EifReader, section: Section, path: str) -> None:
    with open(path, "xb") as handle:
        for chunk in reader.iter_section(section):
            handle.write(chunk)


def _unpack_ramdisk(reader: EifReader, section: Section, dest: str, name: str) -> dict:
    head = reader.section_reader(section).read(6)
    if head not in CPIO_MAGICS:
        return {"name": name, "unpacked": False, "reason": "not an uncompressed cpio newc archive; kept raw only"}
    os.mkdir(dest)
    as_root = os.geteuid() == 0
    result = unpack_archive(reader.section_reader(section), dest, archive_size=section.size,
                            preserve_owner=as_root, keep_setgid=True)
    summary = {key: value for key, value in asdict(result).items()}
    summary["owners_kept"] = as_root
    for key in ("skipped_devices", "stripped_setid"):
        summary[key] = [path.decode("utf-8", "surrogateescape") for path in summary.get(key, [])]
    return {"name": name, "unpacked": True, **summary}


def _write_json(path: str, document: dict) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _mode_after_umask(directory: str, mode: int) -> int:
    """The mode a directory created with ``mode`` gets under the process umask, found by creating
    one (inside ``directory``) rather than by toggling the umask, which other threads share."""
    probe = os.path.join(directory, ".mode-probe")
    os.mkdir(probe, mode)
    try:
        return stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
