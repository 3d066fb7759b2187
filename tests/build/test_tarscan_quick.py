"""TarScanner's one-call path for plain headers (``_quick_member``) sees exactly what the general
path sees: the same members, the same refusals with the same messages (issue 16, per-member cost).

Differential: headers of every kind, each with single bytes of its fields replaced (digits, padding,
signs, high bits, slashes) and the checksum fixed up or not, are scanned once as they are and once
with the quick path turned off; the results must be equal.
"""

from __future__ import annotations

import io
import random

import pytest
from test_hostile_layers import END, header

from qtbuild.convert import tarscan
from qtbuild.convert.tarscan import ByteBudget, TarFormatError, TarLimits, TarScanner

GNU = b"ustar  \0"
V7 = b"\0" * 8

#: (start, end) of the fields a mutation may hit: name, mode, uid, gid, size, mtime, chksum,
#: typeflag, linkname, magic, devmajor, devminor, prefix.
FIELDS = [(0, 100), (100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (156, 157),
          (157, 257), (257, 265), (329, 337), (337, 345), (345, 500)]
BYTES = b"\0 0178/_+-\x80\xffa."


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _bases() -> list[bytes]:
    devices = bytearray(header(b"dev/null", typeflag=b"3"))
    devices[329:345] = b"0000001\x000000003\x00"
    return [
        header(b"f", size=5),
        header(b"dir/", typeflag=b"5", mode=0o755),
        header(b"link", typeflag=b"2", linkname=b"target"),
        header(b"hard", typeflag=b"1", linkname=b"f"),
        header(b"name", size=3, prefix=b"some/prefix"),
        header(b"gnu", size=700, magic=GNU),
        header(b"v7", size=1, magic=V7),
        header(b"old-dir/", typeflag=b"\0"),
        _with_checksum(devices),
    ]


def _scan(stream: bytes, **limits) -> list | str:
    try:
        return list(TarScanner(io.BytesIO(stream), limits=TarLimits(**limits), budget=ByteBudget(1 << 20)))
    except TarFormatError as exc:
        return str(exc)


def _both(stream: bytes, monkeypatch, **limits) -> tuple[list | str, list | str]:
    quick = _scan(stream, **limits)
    with monkeypatch.context() as patch:
        patch.setattr(tarscan, "_quick_member", lambda *args: None)
        general = _scan(stream, **limits)
    return quick, general


def _stream(block: bytes) -> bytes:
    return block + bytes(1024) + END  # data for sizes up to 1 KiB (then the end); larger ones are truncated alike


def test_the_quick_path_takes_the_common_headers(monkeypatch):
    taken = []
    real = tarscan._quick_member
    monkeypatch.setattr(tarscan, "_quick_member", lambda *args: taken.append(real(*args)) or taken[-1])
    assert len(_scan(_stream(header(b"f", size=5)))) == 1
    assert taken and taken[0] is not None and taken[0].name == b"f" and taken[0].size == 5


@pytest.mark.parametrize("fix_checksum", [True, False])
def test_mutated_headers_scan_alike_with_and_without_the_quick_path(monkeypatch, fix_checksum):
    rng = random.Random(16)
    cases = 0
    real = tarscan._quick_member
    taken: list[bool] = []
    monkeypatch.setattr(tarscan, "_quick_member", lambda *args: taken.append(real(*args) is not None) or real(*args))
    for base in _bases():
        assert _both(_stream(base), monkeypatch)[0] == _both(_stream(base), monkeypatch)[1]
        for start, end in FIELDS:
            for _ in range(12):
                block = bytearray(base)
                for _ in range(rng.choice((1, 1, 2))):
                    block[rng.randrange(start, end)] = rng.choice(BYTES)
                mutated = _with_checksum(block) if fix_checksum else bytes(block)
                quick, general = _both(_stream(mutated), monkeypatch)
                assert quick == general, (base[:20], start, mutated[start:end])
                cases += 1
    assert cases > 1000
    floor = 300 if fix_checksum else 30  # a mutation without a fixed-up checksum is mostly refused
    assert floor < sum(taken) < len(taken) - floor  # both paths were exercised


@pytest.mark.parametrize("limits", [{"max_name": 3}, {"max_file_size": 4}])
def test_limits_are_refused_alike(monkeypatch, limits):
    long_links = [header(b"l", typeflag=kind, linkname=b"long-target") for kind in (b"1", b"2")]
    for base in _bases() + long_links:
        quick, general = _both(_stream(base), monkeypatch, **limits)
        assert quick == general


def test_the_budget_refuses_alike(monkeypatch):
    stream = _stream(header(b"f", size=1000))
    for budget in (100, 600, 2000):
        results = []
        for quick in (True, False):
            with monkeypatch.context() as patch:
                if not quick:
                    patch.setattr(tarscan, "_quick_member", lambda *args: None)
                try:
                    results.append(list(TarScanner(io.BytesIO(stream), budget=ByteBudget(budget))))
                except TarFormatError as exc:
                    results.append(str(exc))
        assert results[0] == results[1]


def test_one_stream_of_mutated_headers_scans_alike(monkeypatch):
    """The quick path keeps the mode/uid/gid and mtime fields it parsed for the members after: a
    stream of many headers, some fields repeated and some mutated (more distinct fields than the
    cache holds), gives the same members as the general path, and the same first refusal."""
    rng = random.Random(6)
    fields = [(100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)]
    for _ in range(8):
        blocks = []
        for index in range(2 * tarscan._KNOWN_FIELDS):
            block = bytearray(header(b"f%d" % index, size=index % 3))
            if rng.random() < 0.5:
                start, end = rng.choice(fields)
                block[rng.randrange(start, end)] = rng.choice(b"01234567 \0" if rng.random() < 0.97 else BYTES)
            blocks.append(_with_checksum(block) + bytes(-(index % 3) % 512 + index % 3))
        quick, general = _both(b"".join(blocks) + END, monkeypatch)
        assert quick == general


def test_a_header_across_a_chunk_boundary_is_read_whole():
    """Headers cut by the stream's chunks (any split, tiny chunks included) give the same members."""
    stream = b"".join(header(b"f%d" % i, size=i * 100) + bytes(i * 100 + -(i * 100) % 512) for i in range(40)) + END
    expected = list(TarScanner(io.BytesIO(stream)))

    class Pieces(io.RawIOBase):
        def __init__(self, data: bytes, sizes: list[int]):
            self._data, self._sizes = data, sizes

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            piece, self._data = self._data[:self._sizes[0]], self._data[self._sizes[0]:]
            self._sizes = self._sizes[1:] + self._sizes[:1]
            return piece

    for sizes in ([1], [7, 500], [511, 513, 1], [100, 3000]):
        seen = []
        assert list(TarScanner(Pieces(stream, sizes), tee=seen.append)) == expected
        assert b"".join(seen) == stream
    truncated = stream[:512 * 3 + 100]
    with pytest.raises(TarFormatError, match=r"truncated archive: header at offset 1536 needs 512 bytes"):
        list(TarScanner(Pieces(truncated, [7, 500])))
