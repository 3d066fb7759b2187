"""``oci-archive:PATH[:TAG]``: a tar of an OCI image layout, read in place.

What ``skopeo copy … oci-archive:PATH[:TAG]`` and ``podman save --format oci-archive`` write: the
files of an OCI layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) as members of one
plain tar.  The tar is indexed once and never extracted (:class:`~qtbuild.sources.archive.TarIndex`:
bounded member count and header sizes, no ``..`` or absolute paths, links resolved inside the
archive); blobs are read as byte ranges of the file and verified against their descriptors as they
are read, as for ``oci:DIR``.  TAG is an ``org.opencontainers.image.ref.name`` annotation, exactly
as for an OCI layout directory; without it the archive must hold one image.
"""

from __future__ import annotations

import os

from qtbuild.errors import ImageError
from qtbuild.sources.archive import ArchiveStore, TarIndex
from qtbuild.sources.base import Platform
from qtbuild.sources.layout import check_layout_marker
from qtbuild.sources.select import ANNOTATION_REF_NAME, StoreImage, choose_named_entries, open_from_index, parse_index


class OciArchiveImage(StoreImage):
    """One image of an OCI layout tarball: the entries tagged ``tag`` (or the only image when
    None), narrowed to ``platform``."""

    def __init__(self, path: str | os.PathLike, tag: str | None = None, platform: Platform | None = None):
        self.path = os.fspath(path)
        reference = f"oci-archive:{self.path}" + (f":{tag}" if tag else "")
        if not os.path.isfile(self.path):
            raise ImageError(f"{reference}: no such file")
        index = TarIndex(self.path, kind="oci-archive")
        if "oci-layout" not in index.members:
            hint = " (a docker save tarball: use docker-archive:)" if "manifest.json" in index.members else ""
            raise ImageError(f"{reference}: no oci-layout member; not an OCI layout archive{hint}")
        check_layout_marker(index.read_small("oci-layout", f"{reference}: oci-layout"), reference)
        entries = parse_index(index.read_small("index.json", f"{reference}: index.json"), f"{reference}: index.json")
        chosen = choose_named_entries(
            entries, tag, label=lambda d: d.annotations.get(ANNOTATION_REF_NAME),
            matches=str.__eq__, what=reference, how="name one: oci-archive:PATH:TAG",
        )
        store = ArchiveStore(index)
        _, manifest_bytes = open_from_index(store, chosen, platform=platform, what=reference)
        super().__init__(store, manifest_bytes, reference=reference, platform=platform)
