"""``convert --provenance FILE``: an in-toto Statement with a SLSA Provenance v1 predicate.

The statement (https://in-toto.io/Statement/v1, predicateType https://slsa.dev/provenance/v1)::

    subject               the EIF: name (file name), digest {sha256, sha384}, annotations {PCR0,
                          PCR1, PCR2, PCR8}
    buildDefinition
      buildType           BUILD_TYPE
      externalParameters  the source reference and every option that affects the bytes
      internalParameters  SOURCE_DATE_EPOCH (null when unset) and the launch layout version
      resolvedDependencies  the image manifest (its digest when the source stores one), the
                          config, each layer (stored blob digest, and its diff_id)
    runDetails.builder    {id: BUILDER_ID, version: {qtbuild: VERSION}}

Nothing comes from the clock, the host or temp paths: the same build gives the same bytes
(compact JSON, sorted keys, final newline).  With a signing key the statement is the payload of a
DSSE envelope signed with it (deterministic ECDSA, :mod:`qtbuild.formats.dsse`).
"""

from __future__ import annotations

import hashlib
import json
import os

from qtbuild import __version__
from qtbuild.formats.launch_record import LAUNCH_LAYOUT_VERSION
from qtbuild.runtime.files import write_atomically
from qtbuild.sources.base import Image

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://qtbuild.dev/provenance/convert/v1"
BUILDER_ID = "https://qtbuild.dev/builder/cli"
PCR_NAMES = ("PCR0", "PCR1", "PCR2", "PCR8")
_CHUNK = 1 << 20


def image_dependencies(image: Image) -> list[dict]:
    """resolvedDependencies for an open image: manifest, config, layers (bottom to top)."""
    dependencies = []
    if not image.manifest_synthesised:
        manifest_digest = hashlib.sha256(image.manifest_bytes()).hexdigest()
        dependencies.append({"name": "manifest", "uri": image.reference, "digest": {"sha256": manifest_digest}})
    dependencies.append({"name": "config", "digest": {"sha256": image.image_id.removeprefix("sha256:")}})
    for index, layer in enumerate(image.layers()):
        algorithm, _, value = layer.descriptor.digest.partition(":")
        dependencies.append({
            "name": f"layer {index}",
            "digest": {algorithm: value},
            "annotations": {"diffId": layer.diff_id, "mediaType": layer.descriptor.media_type},
        })
    return dependencies


def file_digests(path: str | os.PathLike) -> dict[str, str]:
    """``{"sha256": …, "sha384": …}`` of a file, read once."""
    sha256, sha384 = hashlib.sha256(), hashlib.sha384()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            sha384.update(chunk)
    return {"sha256": sha256.hexdigest(), "sha384": sha384.hexdigest()}


def provenance_statement(*, eif_path: str | os.PathLike, pcrs: dict[str, str], source: str, parameters: dict,
                         dependencies: list[dict], source_date_epoch: int | None) -> dict:
    """The statement for the EIF at ``eif_path`` (see the module docstring)."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": os.path.basename(os.fspath(eif_path)),
            "digest": file_digests(eif_path),
            "annotations": {name: pcrs[name] for name in PCR_NAMES if name in pcrs},
        }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"source": source, **parameters},
                "internalParameters": {"sourceDateEpoch": source_date_epoch,
                                       "launchLayoutVersion": LAUNCH_LAYOUT_VERSION},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": {"qtbuild": __version__}}},
        },
    }


def statement_bytes(statement: dict) -> bytes:
    return (json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def write_provenance(path: str | os.PathLike, statement: dict, private_key=None) -> None:
    """Write the statement (in a DSSE envelope when ``private_key`` is given) atomically to ``path``."""
    data = statement_bytes(statement)
    if private_key is not None:
        # Imported here: dsse loads `cryptography` (20 ms), which measure and an unsigned convert never use.
        from qtbuild.formats.dsse import sign_envelope

        data = sign_envelope(data, private_key).to_json()
    write_atomically(path, data, 0o644)
