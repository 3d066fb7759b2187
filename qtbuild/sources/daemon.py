"""``docker://REF``: an image in a Docker (or podman) daemon, through its Engine API.

The image is inspected and saved by its ID (:class:`~qtbuild.sources.daemon_request.SaveRequest`:
``GET /images/{id}/get``, what ``docker save`` does; never ``docker run``/``export``), possibly
sent early by the CLI, and the stream is read in 1 MiB chunks as it arrives
(:class:`~qtbuild.sources.save_stream.SaveStreamImage`).  The inspect's ``RootFS.Layers`` (the
diff_ids, bottom to top) are known before the save starts, so layers are handed to the converter
while the daemon is still sending even when the config comes after them; the config, when it
arrives, must list the same diff_ids.  Only what arrives before its turn goes to a spill file
next to the output.  With Engine API >= 1.48 a requested platform is passed to the save; the
inspect's and the saved config's platform are checked against it either way.
"""

from __future__ import annotations

from qtbuild.errors import ImageError
from qtbuild.sources.base import Platform, check_digest
from qtbuild.sources.daemon_request import SaveRequest, take_early
from qtbuild.sources.save_stream import SaveStreamImage
from qtbuild.sources.select import MAX_LAYERS, check_config_platform


class DaemonImage(SaveStreamImage):
    """An image held by the Docker daemon, read from its save stream as the daemon sends it.

    ``scratch_dir`` receives the scratch file for layers that arrive before their turn (the
    output's directory when converting; default: the system temp dir).
    """

    def __init__(self, ref: str, *, platform: Platform | None = None, scratch_dir: str | None = None):
        request = take_early(ref, platform) or SaveRequest(ref, platform)
        try:
            self._inspect = request.inspected()
            reference = f"docker://{ref}"
            image_id = check_digest(self._inspect.get("Id"), f"{reference}: image ID")
            diff_ids = None
            if not request.platform_in_save:  # else the saved image may be another platform's than the inspected
                check_config_platform({"os": self._inspect.get("Os"), "variant": self._inspect.get("Variant"),
                                       "architecture": self._inspect.get("Architecture")}, platform, reference)
                diff_ids = _inspected_diff_ids(self._inspect, reference)
            super().__init__(request.chunks(), image_id=image_id, reference=reference, scratch_dir=scratch_dir,
                             platform=platform, repo_digests=list(self._inspect.get("RepoDigests") or []),
                             diff_ids=diff_ids)
        except BaseException:
            request.close()  # the chunks may never have been read
            raise


def _inspected_diff_ids(inspect: dict, what: str) -> list[str]:
    """The inspect's ``RootFS.Layers``: the diff_ids the daemon's config lists, bottom to top."""
    rootfs = inspect.get("RootFS")
    layers = rootfs.get("Layers") if isinstance(rootfs, dict) else None
    if layers is None and isinstance(rootfs, dict) and rootfs.get("Type") == "layers":
        layers = []  # an image of no layers: the daemon leaves the list out
    if not isinstance(layers, list):
        raise ImageError(f"{what}: the daemon's image inspect has no RootFS.Layers list")
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(layers)} layers; refusing more than {MAX_LAYERS}")
    return [check_digest(d, f"{what}: inspect RootFS layer {i}") for i, d in enumerate(layers)]
