"""Cloud profiles: everything the local runtime does differently for Huawei Cloud QingTian and
AWS Nitro, in one place (facts and sources: ``docs/attestation-shapes.md``).

==================  ==========================================  ==========================================
                    qingtian (default)                          nitro
==================  ==========================================  ==========================================
device              /dev/qtsm                                   /dev/nsm
document encoding   :data:`~qtbuild.formats.attestation_encoding.QINGTIAN`  :data:`~...NITRO`
field limits        user_data / nonce ≤ 512, certificates ≤ 4096  user_data / nonce ≤ 1024, certificates ≤ 1024
chain below root    region 20 d (pathLen 3) → grid 6 d (2) →    region 20 d (pathLen 2) → zone 6 d (1) →
                    instance 1 d (1) → leaf 3 h                 instance 1 d (0) → leaf 3 h
module_id           ``<parent UUID>.enc-<16 hex>`` (57 chars)   ``i-<17 hex>-enc<16 hex>`` (39 chars)
image PCRs          PCR0 (PCR1/PCR2 stay zero)                  PCR0, PCR1, PCR2
always measured     PCR4 = extend(parent instance UUID)         PCR4 = extend(parent instance id)
when given          PCR3 = extend(role / agency), PCR8          PCR3 = extend(role ARN), PCR8
output shapes       qt's JSON                                   nitro-cli's JSON
response size       ≤ 0x6000 bytes (libqtsm's buffer)           ≤ 0x3000 bytes (NSM_RESPONSE_MAX_SIZE)
==================  ==========================================  ==========================================

Short-lived certificates are re-issued by :class:`~qtbuild.runtime.qtsm.pki.LocalPki` before they
expire (a CA when less than its child's full lifetime remains), so a local PKI never expires.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from qtbuild.formats.attestation import NITRO_LIMITS, QINGTIAN_LIMITS, SyntaxLimits
from qtbuild.formats.attestation_encoding import NITRO, QINGTIAN, DocumentEncoding
from qtbuild.formats.measure import Measurements, extend
from qtbuild.runtime.qtsm.cloud_names import CLOUDS, DEFAULT_CLOUD

_NITRO_INSTANCE = re.compile(r"i-[0-9a-f]{17}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Namespace for parent UUIDs derived from a non-UUID instance id or a machine id.
_PARENT_NAMESPACE = uuid.UUID("6f1e3c52-8d0b-5c5e-9a7d-0b6c1d2e3f40")


@dataclass(frozen=True)
class CaLevel:
    """One intermediate CA level below the root: its name, lifetime and pathLen."""

    name: str
    validity: timedelta
    path_length: int


@dataclass(frozen=True)
class CloudProfile:
    """What one cloud does; the two instances are :data:`PROFILES`."""

    name: str
    title: str
    device_path: str
    encoding: DocumentEncoding
    limits: SyntaxLimits
    #: Intermediate CAs, the one under the root first; the bundle is [root, *intermediates].
    intermediates: tuple[CaLevel, ...]
    leaf_validity: timedelta
    #: Whether the leaf carries subject/authority key identifiers (QingTian: authority only).
    leaf_authority_key_id: bool
    #: The image PCRs the platform reports (others of 0..2 stay zero).
    image_pcrs: tuple[int, ...]
    #: JSON shapes the enclave commands print by default ("qingtian": qt, "nitro": nitro-cli).
    output_format: str
    #: Largest response the device returns (libqtsm's QTSM_RESPONSE_MAX_SIZE 0x6000; Nitro's
    #: NSM_RESPONSE_MAX_SIZE 0x3000); requests are bounded at 0x1000 on both.
    max_response: int = 0x3000

    def check_instance_id(self, instance_id: str | None) -> None:
        """ValueError unless ``instance_id`` (when given) has this cloud's shape: a UUID on
        QingTian, ``i-`` and 17 hex digits on Nitro (PCR4 measures it as given)."""
        if instance_id is None:
            return
        pattern, shape = (_NITRO_INSTANCE, "i- and 17 hex digits") if self.name == "nitro" else (_UUID, "a UUID")
        if not pattern.fullmatch(instance_id.lower()):
            raise ValueError(f"{self.title} parent instance ids are {shape}, not {instance_id!r}")

    def parent_id(self, instance_id: str | None, machine_id: bytes) -> str:
        """The parent instance id as this cloud writes it: ``instance_id`` when it has the
        cloud's shape, else one derived from it (or from ``machine_id``) deterministically."""
        seed = instance_id.encode() if instance_id else machine_id
        if self.name == "nitro":
            if instance_id and _NITRO_INSTANCE.fullmatch(instance_id):
                return instance_id
            return "i-" + hashlib.sha256(seed).hexdigest()[:17]
        if instance_id and _UUID.fullmatch(instance_id.lower()):
            return instance_id.lower()
        return str(uuid.uuid5(_PARENT_NAMESPACE, seed.hex()))

    def module_id(self, enclave_key: str, parent_id: str) -> str:
        """The module id of an enclave: stable for ``enclave_key`` (unique per enclave run)."""
        suffix = hashlib.sha256(enclave_key.encode()).hexdigest()[:16]
        if self.name == "nitro":
            return f"{parent_id}-enc{suffix}"
        return f"{parent_id}.enc-{suffix}"

    def boot_pcrs(
        self, measurements: Measurements, *, parent_id: str, parent_role: str | None = None
    ) -> dict[int, bytes]:
        """PCRs 0–15 as the platform fills them (absent = zero), from the image as loaded.

        PCR3 / PCR4 are SHA384(48 zero bytes ‖ UTF-8 text) of the role and the parent id.
        """
        image = {0: measurements.pcr0, 1: measurements.pcr1, 2: measurements.pcr2}
        pcrs = {index: image[index] for index in self.image_pcrs}
        if parent_role:
            pcrs[3] = extend(parent_role.encode())
        pcrs[4] = extend(parent_id.encode())
        if measurements.pcr8 is not None:
            pcrs[8] = measurements.pcr8
        return pcrs


QINGTIAN_PROFILE = CloudProfile(
    name="qingtian",
    title="Huawei Cloud QingTian",
    device_path="/dev/qtsm",
    encoding=QINGTIAN,
    limits=QINGTIAN_LIMITS,
    intermediates=(
        CaLevel("region", timedelta(days=20), 3),
        CaLevel("grid", timedelta(days=6), 2),
        CaLevel("instance", timedelta(days=1), 1),
    ),
    leaf_validity=timedelta(hours=3),
    leaf_authority_key_id=True,
    image_pcrs=(0,),
    output_format="qingtian",
    max_response=0x6000,
)
NITRO_PROFILE = CloudProfile(
    name="nitro",
    title="AWS Nitro",
    device_path="/dev/nsm",
    encoding=NITRO,
    limits=NITRO_LIMITS,
    intermediates=(
        CaLevel("region", timedelta(days=20), 2),
        CaLevel("zone", timedelta(days=6), 1),
        CaLevel("instance", timedelta(days=1), 0),
    ),
    leaf_validity=timedelta(hours=3),
    leaf_authority_key_id=False,
    image_pcrs=(0, 1, 2),
    output_format="nitro",
)
PROFILES = {profile.name: profile for profile in (QINGTIAN_PROFILE, NITRO_PROFILE)}


def machine_seed() -> bytes:
    """This machine's identity (``/etc/machine-id``) from which parent ids are derived when none
    is given; random bytes when the machine has none."""
    try:
        with open("/etc/machine-id", "rb") as handle:
            return b"qtbuild-parent:" + handle.read(64)
    except OSError:
        return secrets.token_bytes(16)


def profile(name: str | None) -> CloudProfile:
    """The profile called ``name`` (None: the default); ValueError naming the choices."""
    try:
        return PROFILES[name or DEFAULT_CLOUD]
    except KeyError:
        raise ValueError(f"unknown cloud {name!r}: choose {' or '.join(CLOUDS)}") from None
