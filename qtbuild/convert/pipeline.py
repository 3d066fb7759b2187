"""The convert pipeline: image source → flattened tree → ramdisks → EIF (streamed, atomic).

One pass over the layers builds the in-memory tree (file data stays in the source blobs or the
spill store; ``measure`` spills nothing for local blobs but inflates them again); one pass writes
the EIF, streaming the customer ramdisk straight from that data into the writer, which hashes and
checksums it on the way.  Same image content gives the same bytes whatever the source: nothing
here depends on the source's reference, the wall clock, the environment or temp paths.

Metadata defaults are content-derived for that reason: ImageName ``enclave`` (or ``--name``),
ImageVersion the image ID (or ``--version``), BuildTime SOURCE_DATE_EPOCH else the image's
``created`` time, DockerInfo ``{Architecture, Config, Id, Os}`` — no RepoDigests, which differ
between a registry pull and a saved tarball of the same image.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from qtbuild.convert.boot_profiles import load_profile, normalise_arch
from qtbuild.convert.credential_scan import CANDIDATE_DIRECTORIES, CANDIDATE_NAMES, credential_warnings
from qtbuild.convert.flatten import FlatTree, flatten
from qtbuild.convert.gil import short_gil_switches
from qtbuild.convert.launch_config import Launch, resolve_launch, tree_file_reader
from qtbuild.convert.metadata import load_custom_metadata, make_metadata, source_date_epoch
from qtbuild.convert.progress_bar import progress_bar
from qtbuild.convert.provenance import image_dependencies
from qtbuild.convert.ramdisk import customer_ramdisk
from qtbuild.convert.verify_gate import deferred_verification
from qtbuild.convert.write_total import estimated_write_total
from qtbuild.errors import ImageError
from qtbuild.formats.eif_writer import Signer, WriteResult, write_eif
from qtbuild.sources.base import Image, Platform, enclave_platform
from qtbuild.sources.open import open_image
from qtbuild.sources.save_stream import SaveStreamImage


@dataclass
class ConvertOptions:
    """Everything ``qtbuild convert`` / ``measure`` take besides the source."""

    output: str | None = None
    platform: str | None = None
    blobs: str | None = None
    cmdline: str | None = None
    name: str | None = None
    version: str | None = None
    metadata_path: str | None = None
    cmd_semantics: str = "oci"
    signer: Signer | None = None
    quiet: bool = False
    spill_dir: str | None = None


@dataclass
class ConvertResult:
    """What a conversion produced."""

    result: WriteResult
    image_id: str
    arch: str
    launch: Launch
    profile: str
    warnings: list[str] = field(default_factory=list)
    #: The image's manifest, config and layer digests (provenance resolvedDependencies).
    dependencies: list[dict] = field(default_factory=list)


def convert(source: str, options: ConvertOptions) -> ConvertResult:
    """Convert ``source`` into an EIF at ``options.output`` (or only measure it when None)."""
    clamp = source_date_epoch()
    platform = enclave_platform(options.platform) if options.platform else None
    custom = load_custom_metadata(options.metadata_path)
    output_dir = os.path.dirname(os.path.abspath(options.output)) if options.output else None
    with open_image(source, platform=platform, scratch_dir=output_dir) as image, contextlib.ExitStack() as owned:
        owned.enter_context(short_gil_switches())  # threads back from C code get the GIL sooner
        # A save stream's layers are flattened as they arrive; its config may come after them.
        tree = owned.enter_context(_flatten(image, options, clamp)) if isinstance(image, SaveStreamImage) else None
        config = image.config()
        arch = _image_arch(config, platform)
        profile = load_profile(options.blobs, arch)
        # Before the layers are read: a config the metadata section cannot carry fails fast.
        metadata = make_metadata(
            name=options.name or "enclave",
            version=options.version or image.image_id,
            kernel_version=profile.kernel_version,
            docker_info=_docker_info(image, config),
            custom=custom,
            time_fallback=None if clamp else _created(config),
        )
        # Layers read in place (never a save stream's) are still being verified while the EIF is written: the
        # ramdisk's gate holds the commit.
        verification = owned.enter_context(deferred_verification())
        if tree is None:
            tree = owned.enter_context(_flatten(image, options, clamp))
        read_file = tree_file_reader(tree)
        launch = resolve_launch(config, read_file, semantics=options.cmd_semantics)
        # Only the paths the scan could warn about: a pass over every path held the hashing lanes back.
        paths = (path.decode("utf-8", "replace") for path in tree.find_paths(CANDIDATE_NAMES, CANDIDATE_DIRECTORIES))
        warnings = list(tree.warnings) + credential_warnings(config, paths, read_file)
        ramdisk = customer_ramdisk(tree, launch)  # written in one pass: its size is known at the end
        with contextlib.closing(progress_bar("ramdisk", options.quiet)) as bar:
            if not bar.disable:  # the estimate walks the tree: only for a bar someone sees
                bar.reset(total=estimated_write_total(profile, options.cmdline or profile.cmdline, metadata, tree,
                                                      launch))
            result = write_eif(
                options.output,
                kernel=profile.kernel,
                cmdline=options.cmdline or profile.cmdline,
                ramdisks=[profile.bootstrap, verification.gate(ramdisk)],
                metadata=metadata,
                arch=arch,
                signer=options.signer,
                progress=bar.update,
            )
        tree.verify_rereads()
        return ConvertResult(result, image.image_id, arch, launch, profile.name, warnings,
                             image_dependencies(image))


def _flatten(image: Image, options: ConvertOptions, clamp: datetime | None) -> FlatTree:
    with contextlib.closing(progress_bar("layers", options.quiet)) as bar:
        clamp_mtime = int(clamp.timestamp()) if clamp else None
        # measure keeps nothing: compressed local layers are inflated again rather than spilled
        return flatten(image.layers(), spill_dir=_spill_dir(image, options), clamp_mtime=clamp_mtime,
                       progress=None if bar.disable else bar.update, reread=options.output is None)


def _spill_dir(image: Image, options: ConvertOptions) -> str | None:
    """Where flatten spills layer data: ``options.spill_dir``, else, for a save stream, beside its scratch file
    (the output's directory: the image's bytes are not duplicated into ``$TMPDIR``), else the temp dir."""
    if options.spill_dir is None and isinstance(image, SaveStreamImage):
        return image.scratch_dir
    return options.spill_dir


def _image_arch(config: dict, platform: Platform | None) -> str:
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ImageError("image config has no architecture")
    if config.get("os", "linux") != "linux":
        raise ImageError(f"image is for os {config.get('os')!r}; enclaves run linux images")
    arch = normalise_arch(architecture)
    if platform is not None and normalise_arch(platform.architecture) != arch:
        raise ImageError(f"--platform {platform} was asked for but the image is {architecture}")
    return arch


def _docker_info(image: Image, config: dict) -> dict:
    return {
        "Architecture": config.get("architecture"),
        "Config": config.get("config") or {},
        "Id": image.image_id,
        "Os": config.get("os", "linux"),
    }


def _created(config: dict) -> datetime | None:
    """The image's ``created`` time in UTC; None when absent or unparseable (BuildTime then falls
    back to 1970).  A parseable time that UTC cannot represent (year 1 with a positive offset) is
    an ImageError, since silently dropping it would hide a hostile or broken config."""
    created = config.get("created")
    if not isinstance(created, str):
        return None
    text = created.strip().replace("Z", "+00:00")
    if "." in text:  # Go writes nanoseconds; Python takes at most microseconds
        head, _, tail = text.partition(".")
        digits = len(tail) - len(tail.lstrip("0123456789"))
        text = f"{head}.{tail[:digits][:6].ljust(6, '0')}{tail[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if not moment.tzinfo:
        return None
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ImageError(f"image config: created time {created[:64]!r} is outside the dates UTC can represent; "
                         f"fix it or set SOURCE_DATE_EPOCH") from None
