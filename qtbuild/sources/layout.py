"""``oci:DIR[:TAG]``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

Tags are the ``org.opencontainers.image.ref.name`` annotations of ``index.json``'s entries;
nested indexes, platform selection and attestation skipping follow :mod:`qtbuild.sources.select`.
Blobs are opened as ``blobs/<alg>/<hex>`` only after the digest string is validated, must be
regular files (symlinks to regular files are followed; their content is verified anyway), and
are verified against their descriptors as they are read.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json_object, read_bounded
from qtbuild.sources.base import MAX_JSON_DOCUMENT, Descriptor, Platform, check_digest
from qtbuild.sources.blobs import BlobStore
from qtbuild.sources.select import (
    ANNOTATION_REF_NAME,
    StoreImage,
    choose_named_entries,
    open_from_index,
    parse_index,
)


class LayoutStore(BlobStore):
    """The ``blobs/`` directory of an OCI layout."""

    def __init__(self, directory: str):
        self.directory = directory

    def blob_path(self, d: Descriptor) -> str:
        algorithm, _, hexdigest = check_digest(d.digest, f"{self.directory}: blob").partition(":")
        return os.path.join(self.directory, "blobs", algorithm, hexdigest)

    def _regular_file(self, d: Descriptor) -> tuple[str, int]:
        path = self.blob_path(d)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageError(f"oci:{self.directory}: blob {d.digest} is missing") from None
        except OSError as exc:
            raise ImageError(f"oci:{self.directory}: blob {d.digest}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"oci:{self.directory}: blob {d.digest} is not a regular file")
        return path, st.st_size

    def has(self, d: Descriptor) -> bool:
        return os.path.isfile(self.blob_path(d))

    def open_raw(self, d: Descriptor) -> BinaryIO:
        path, _ = self._regular_file(d)
        return open(path, "rb")

    def local_range(self, d: Descriptor) -> tuple[str, int, int] | None:
        path, size = self._regular_file(d)
        return path, 0, size


def _read_small_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return read_bounded(f, MAX_JSON_DOCUMENT, ImageError(f"{what} is over {MAX_JSON_DOCUMENT} bytes"))
    except FileNotFoundError:
        raise ImageError(f"{what} is missing") from None
    except OSError as exc:
        raise ImageError(f"{what}: cannot read: {exc.strerror or exc}") from None


def _check_layout_marker(directory: str, reference: str) -> None:
    check_layout_marker(_read_small_file(os.path.join(directory, "oci-layout"), f"{reference}: oci-layout"), reference)


def check_layout_marker(raw: bytes, reference: str) -> None:
    """ImageError unless ``raw`` (an ``oci-layout`` file) declares imageLayoutVersion 1.x."""
    try:
        version = load_json_object(raw, what="oci-layout", error=ImageError).get("imageLayoutVersion")
    except ImageError:
        version = None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{reference}: oci-layout does not declare imageLayoutVersion 1.x")


class LayoutImage(StoreImage):
    """One image of an OCI layout: the entries tagged ``tag`` (or the only image when None),
    narrowed to ``platform``."""

    def __init__(self, directory: str | os.PathLike, tag: str | None = None, platform: Platform | None = None):
        self.directory = os.fspath(directory)
        reference = f"oci:{self.directory}" + (f":{tag}" if tag else "")
        if not os.path.isdir(self.directory):
            raise ImageError(f"{reference}: not a directory")
        _check_layout_marker(self.directory, reference)
        index_bytes = _read_small_file(os.path.join(self.directory, "index.json"), f"{reference}: index.json")
        entries = parse_index(index_bytes, f"{reference}: index.json")
        chosen = choose_named_entries(
            entries, tag, label=lambda d: d.annotations.get(ANNOTATION_REF_NAME),
            matches=str.__eq__, what=reference, how="name one: oci:DIR:TAG",
        )
        store = LayoutStore(self.directory)
        _, manifest_bytes = open_from_index(store, chosen, platform=platform, what=reference)
        super().__init__(store, manifest_bytes, reference=reference, platform=platform)
