"""`qtbuild diff`: explain why two images' PCRs differ.

Levels, most general first: header fields; sections (paired by type and occurrence: kernel with
kernel, ramdisk N with ramdisk N) with the PCRs each difference moves; metadata keys; then the
files of each ramdisk pair — added, removed, changed (content SHA-256, size, mode, owner, mtime,
link target, device numbers) — sorted by path.

Ramdisks are streamed once each; only per-file metadata and content hashes are kept, so
multi-gigabyte images are compared in bounded memory (a few hundred bytes per file).

When the two images' launch records (``launch.json``) have different layout versions, the report
says so (``LaunchLayout``): qtbuild changed how it turns an image config into the launch record
(CHANGELOG.md), which moves PCR0/PCR2 even for the same container image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from qtbuild.formats.cpio import iter_archive
from qtbuild.formats.eif import EifReader, Section, SectionType
from qtbuild.formats.errors import FormatError
from qtbuild.formats.launch_record import MAX_LAUNCH_FILE, parse_launch_json
from qtbuild.inspect.describe import ImageFacts, inspect_image

CPIO_MAGICS = (b"070701", b"070702")
FILE_FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "sha256", "link_target", "rdev")


def pcrs_moved_by(section_type: SectionType, ramdisk_index: int | None) -> list[str]:
    """Which PCRs a change to this section's data moves."""
    if section_type in (SectionType.KERNEL, SectionType.CMDLINE):
        return ["PCR0", "PCR1"]
    if section_type == SectionType.RAMDISK:
        return ["PCR0", "PCR1"] if ramdisk_index == 0 else ["PCR0", "PCR2"]
    if section_type == SectionType.SIGNATURE:
        return ["PCR8"]
    return []


@dataclass(frozen=True)
class FileInfo:
    """What is compared for each file of a ramdisk."""

    type: str
    mode: str
    uid: int
    gid: int
    mtime: int
    size: int
    sha256: str | None
    link_target: str | None
    rdev: str | None


def diff_eifs(a: EifReader, b: EifReader) -> dict:
    """The difference report between two open images (``Identical`` true when bytes agree)."""
    facts_a, facts_b = inspect_image(a), inspect_image(b)
    layouts: dict[str, int] = {}
    report: dict = {
        "Measurements": _measurement_diff(facts_a, facts_b),
        "Header": _header_diff(a, b),
        "Sections": _section_diff(a, b, facts_a, facts_b),
        "Metadata": _metadata_diff(facts_a.metadata, facts_b.metadata),
        "Ramdisks": _ramdisk_diffs(a, b, layouts),
    }
    if layouts.get("A") != layouts.get("B"):
        report["LaunchLayout"] = {"A": layouts.get("A"), "B": layouts.get("B")}
    report["Identical"] = not (report["Measurements"]["Moved"] or report["Header"] or report["Sections"]
                               or report["Metadata"]
                               or any(r["Added"] or r["Removed"] or r["Changed"] for r in report["Ramdisks"]))
    return {"Identical": report.pop("Identical"), **report}


def _measurement_diff(facts_a: ImageFacts, facts_b: ImageFacts) -> dict:
    a, b = facts_a.check.measurements.as_hex(), facts_b.check.measurements.as_hex()
    names = sorted(set(a) | set(b))
    return {"A": a, "B": b, "Moved": [name for name in names if a.get(name) != b.get(name)]}


def _header_diff(a: EifReader, b: EifReader) -> list[dict]:
    fields = {
        "version": lambda r: r.header.version,
        "architecture": lambda r: r.arch,
        "default_mem": lambda r: r.header.default_mem,
        "default_cpus": lambda r: r.header.default_cpus,
        "num_sections": lambda r: r.header.num_sections,
        "section_types": lambda r: [s.type.label for s in r.sections],
    }
    return [{"Field": name, "A": get(a), "B": get(b)} for name, get in fields.items() if get(a) != get(b)]


def _paired_sections(reader: EifReader, digests: list[bytes]) -> dict[tuple[str, int], tuple[Section, bytes]]:
    counts: dict[SectionType, int] = {}
    paired = {}
    for section, digest in zip(reader.sections, digests, strict=True):
        index = counts.get(section.type, 0)
        counts[section.type] = index + 1
        paired[(section.type.label, index)] = (section, digest)
    return paired


def _section_diff(a: EifReader, b: EifReader, facts_a: ImageFacts, facts_b: ImageFacts) -> list[dict]:
    left = _paired_sections(a, facts_a.check.section_sha384)
    right = _paired_sections(b, facts_b.check.section_sha384)
    out = []
    for key in sorted(set(left) | set(right), key=lambda k: (SectionType[k[0].upper()], k[1])):
        sa, sb = left.get(key), right.get(key)
        if sa and sb and sa[1] == sb[1]:
            continue
        kind = SectionType[key[0].upper()]
        out.append({
            "Section": f"{key[0]} {key[1]}" if kind == SectionType.RAMDISK else key[0],
            "A": {"Size": sa[0].size, "Sha384": sa[1].hex()} if sa else None,
            "B": {"Size": sb[0].size, "Sha384": sb[1].hex()} if sb else None,
            "Moves": pcrs_moved_by(kind, key[1]),
        })
    return out


def _flatten_json(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten_json(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _metadata_diff(a: dict | None, b: dict | None) -> list[dict]:
    left, right = _flatten_json(a or {}), _flatten_json(b or {})
    return [{"Key": key, "A": left.get(key), "B": right.get(key)}
            for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]


def _ramdisk_diffs(a: EifReader, b: EifReader, layouts: dict[str, int]) -> list[dict]:
    """File-level differences of each ramdisk pair; ``layouts`` receives each side's launch layout
    version (key "A"/"B", absent when the image has no launch.json)."""
    out = []
    for index in range(max(len(a.ramdisks), len(b.ramdisks))):
        files_a = _index_ramdisk(a, index, layouts, "A")
        files_b = _index_ramdisk(b, index, layouts, "B")
        out.append(_compare_files(index, files_a, files_b))
    return out


def _layout_version(data: bytes) -> int | None:
    try:
        return parse_launch_json(data).version
    except FormatError:
        return None


def _index_ramdisk(reader: EifReader, index: int, layouts: dict[str, int] | None = None,
                   side: str = "") -> dict[str, FileInfo] | None:
    """path → FileInfo for one ramdisk; {} when absent, None when it is not an uncompressed cpio.
    A ``launch.json`` at the archive root also records its layout version in ``layouts[side]``."""
    if index >= len(reader.ramdisks):
        return {}
    section = reader.ramdisks[index]
    if reader.section_reader(section).read(6) not in CPIO_MAGICS:
        return None
    files: dict[str, FileInfo] = {}
    link_paths: dict[int, list[str]] = {}
    link_data: dict[int, tuple[int, str | None]] = {}
    for member, data in iter_archive(reader.section_reader(section), archive_size=section.size):
        path = member.path.decode("utf-8", "surrogateescape")
        digest: str | None
        if layouts is not None and path == "launch.json" and member.is_file and member.size <= MAX_LAUNCH_FILE:
            content = b"".join(bytes(chunk) for chunk in data)
            version = _layout_version(content)
            if version is not None:
                layouts[side] = version
            digest = hashlib.sha256(content).hexdigest()
        else:
            digest = _hash_member(data) if member.is_file else None
        if member.is_file and member.nlink > 1:
            link_paths.setdefault(member.ino, []).append(path)
            if member.size and digest is not None:
                link_data[member.ino] = (member.size, digest)
        files[path] = FileInfo(
            type=_type_name(member), mode=f"{member.mode & 0o7777:04o}", uid=member.uid, gid=member.gid,
            mtime=member.mtime, size=member.size, sha256=digest,
            link_target=(member.link_target.decode("utf-8", "surrogateescape")
                         if member.link_target is not None else None),
            rdev=f"{member.rdev[0]}:{member.rdev[1]}" if member.is_device else None,
        )
    for ino, (size, digest) in link_data.items():  # newc stores hardlink data on the last link only
        for path in link_paths[ino]:
            files[path] = FileInfo(**{**asdict(files[path]), "size": size, "sha256": digest})
    return files


def _hash_member(data) -> str:
    hasher = hashlib.sha256()
    while chunk := data.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest()


def _type_name(member) -> str:
    for name in ("dir", "file", "symlink", "char_device", "block_device", "fifo", "socket"):
        if getattr(member, f"is_{name}", False):
            return name
    return "unknown"


def _compare_files(index: int, a: dict[str, FileInfo] | None, b: dict[str, FileInfo] | None) -> dict:
    result: dict = {"Ramdisk": index, "Added": [], "Removed": [], "Changed": []}
    if a is None or b is None:
        result["Note"] = "not an uncompressed cpio archive: compared at section level only"
        return result
    for path in sorted(set(a) | set(b)):
        if path not in a:
            result["Added"].append(path)
        elif path not in b:
            result["Removed"].append(path)
        elif a[path] != b[path]:
            left, right = asdict(a[path]), asdict(b[path])
            changes = {name: [left[name], right[name]] for name in FILE_FIELDS if left[name] != right[name]}
            result["Changed"].append({"Path": path, **changes})
    return result


def summary_lines(report: dict) -> list[str]:
    """A human-readable rendering of a diff report."""
    if report["Identical"]:
        return ["images are identical"]
    lines = []
    measurements = report["Measurements"]
    for name in measurements["Moved"]:
        lines.append(f"{name} differs: {measurements['A'].get(name, '-')} -> {measurements['B'].get(name, '-')}")
    if "LaunchLayout" in report:
        lines.append(launch_layout_line(report["LaunchLayout"]["A"], report["LaunchLayout"]["B"]))
    for item in report["Header"]:
        lines.append(f"header {item['Field']}: {item['A']} -> {item['B']}")
    for item in report["Sections"]:
        sizes = f"{(item['A'] or {}).get('Size', 'absent')} -> {(item['B'] or {}).get('Size', 'absent')} bytes"
        moves = ", ".join(item["Moves"]) or "no PCR"
        lines.append(f"section {item['Section']} differs ({sizes}); moves {moves}")
    for item in report["Metadata"]:
        lines.append(f"metadata {item['Key']}: {json.dumps(item['A'])} -> {json.dumps(item['B'])} (not measured)")
    for ramdisk in report["Ramdisks"]:
        prefix = f"ramdisk {ramdisk['Ramdisk']}"
        if "Note" in ramdisk:
            lines.append(f"{prefix}: {ramdisk['Note']}")
        lines += [f"{prefix}: + {path}" for path in ramdisk["Added"]]
        lines += [f"{prefix}: - {path}" for path in ramdisk["Removed"]]
        for change in ramdisk["Changed"]:
            fields = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in change.items() if k != "Path")
            lines.append(f"{prefix}: ~ {change['Path']}: {fields}")
    return lines



def launch_layout_line(a: int | None, b: int | None) -> str:
    """Why PCR0/PCR2 move when the launch layout versions differ (see CHANGELOG.md)."""
    name = lambda version: f"version {version}" if version is not None else "no launch.json"  # noqa: E731
    return (f"launch layout {name(a)} -> {name(b)}: qtbuild changed how the launch record is derived from the "
            "image config (CHANGELOG.md), which moves PCR0 and PCR2 even for the same image")
