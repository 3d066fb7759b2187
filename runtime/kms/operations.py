"""The KMS APIs: one handler per Huawei KMS operation, plus the admin operations.

Each handler takes a :class:`Call` (the authenticated principal, the project, the checked body
fields, the verified recipient if any) and returns the JSON reply, or raises KmsError.  Every
handler validates its fields first, then calls :meth:`Call.authorize` (policy decision on the
action names and the key's resource name), then touches keys.  APIS maps each API name to its
handler and whether it takes a ``recipient``; with one, plaintext leaves only as
``ciphertext_recipient``.

Policy action names (any listed name grants the API):

    create-key kms:cmk:create            list-keys kms:cmk:list        describe-key kms:cmk:get
    enable-key kms:cmk:enable            disable-key kms:cmk:disable
    schedule-/cancel-key-deletion kms:cmk:update
    encrypt-data kms:cmk:encrypt         decrypt-data kms:cmk:decrypt
    create-datakey[-without-plaintext]   kms:dek:create, kms:cmk:createDataKey
    encrypt-datakey kms:dek:encrypt, kms:dek:crypto
    decrypt-datakey kms:dek:decrypt      gen-random kms:cmk:generate
    sign kms:cmk:sign                    verify kms:cmk:verify
    get-publickey kms:cmk:getPublicKey
    create-alias kms:alias:create        list-aliases kms:alias:list
    delete-alias kms:alias:delete        associate-alias kms:alias:associate
    update-key-alias kms:cmk:update
    create-rsa-/create-ec-datakey-pair   kms:dek:create, kms:cmk:createDataKeyPair

Aliases are Huawei's REST paths: ``POST|GET|DELETE /kms/aliases`` (create / list / delete),
``POST /kms/alias/associate``; the service maps them to the names above.

Asymmetric keys (create-key with key_spec RSA_2048/3072/4096 or EC_P256/EC_P384, usage
SIGN_VERIFY, or ENCRYPT_DECRYPT for RSA): sign / verify / get-publickey, and encrypt-data /
decrypt-data with encryption_algorithm RSAES_OAEP_SHA_1 / RSAES_OAEP_SHA_256 (``asymmetric``).

Admin APIs (``admin/...``) need a principal created as admin; policies do not apply to them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from qtbuild.runtime.kms import asymmetric, credentials, crypto
from qtbuild.runtime.kms.environment import Environment
from qtbuild.runtime.kms.errors import KmsError, invalid
from qtbuild.runtime.kms.fields import Fields
from qtbuild.runtime.kms.policy import Decision, PolicyError, evaluate, parse_policy
from qtbuild.runtime.kms.recipient import Recipient
from qtbuild.runtime.kms.store import (
    DISABLED,
    ENABLED,
    PENDING_DELETION,
    AliasRecord,
    Conflict,
    KeyRecord,
    PrincipalRecord,
)

MAX_PLAINTEXT = 4096
MAX_AAD = 128
MAX_DATAKEY_BYTES = 1024
_ALIAS = re.compile(r"[A-Za-z0-9:/_-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_ACCESS_KEY = re.compile(r"[A-Z0-9]{20}")
_KEY_STATES = ("1", "2", "3", "4", "5")
_DAY_MS = 86_400_000


@dataclass
class Call:
    """One authenticated request; also what the audit log records about it."""

    env: Environment
    principal: PrincipalRecord
    project_id: str
    fields: Fields
    recipient: Recipient | None = None
    key_id: str | None = None
    decision: Decision | None = None
    also: tuple[str, ...] = ()      # further action names granting this call (AWS's, on that protocol)

    def authorize(self, actions: tuple[str, ...], key_id: str | None = None) -> None:
        """Evaluate the principal's policy; KMS.0306 (key) / KMS.0307 (API) when denied."""
        actions = actions + self.also
        resource = "*" if key_id is None else (
            f"kms:{self.env.region}:{self.project_id}:KeyId:{key_id}")
        context = self.recipient.conditions() if self.recipient else {}
        self.key_id = key_id
        self.decision = evaluate(_policy(self.principal.policy), actions, resource, context)
        if not self.decision.allowed:
            code = "KMS.0307" if key_id is None else "KMS.0306"
            raise KmsError(code, f"Access denied: {self.decision.reason}.")

    def authorize_admin(self) -> None:
        allowed = self.principal.admin
        self.decision = Decision(allowed, "admin principal" if allowed else "not an admin")
        if not allowed:
            raise KmsError("KMS.0307", "Access denied: admin APIs need an admin principal.")

    def key(self, key_id: str) -> KeyRecord:
        record = self.env.store.key(self.project_id, key_id)
        if record is None or _deleted(record, self.env.now_ms()):
            raise KmsError("KMS.0207", f"The key {key_id} does not exist.")
        return record

    def usable_key(self, key_id: str) -> KeyRecord:
        """The key, which must be enabled (KMS.0209 disabled, KMS.0210 pending deletion)."""
        record = self.key(key_id)
        if record.state == DISABLED:
            raise KmsError("KMS.0209")
        if record.state != ENABLED:
            raise KmsError("KMS.0210")
        return record

    def symmetric_key(self, key_id: str) -> KeyRecord:
        """An enabled AES key (the symmetric APIs refuse asymmetric ones)."""
        record = self.usable_key(key_id)
        if asymmetric.is_asymmetric(record.key_spec):
            raise invalid("key_id", f"{key_id} is a {record.key_spec} key; this API needs a symmetric key")
        return record

    def asymmetric_key(self, key_id: str, usage: str) -> KeyRecord:
        """An enabled asymmetric key of ``usage`` (SIGN_VERIFY or ENCRYPT_DECRYPT)."""
        record = self.usable_key(key_id)
        if not asymmetric.is_asymmetric(record.key_spec) or record.key_usage != usage:
            raise invalid("key_id", f"{key_id} is a {record.key_spec} {record.key_usage} key; "
                                    f"this API needs an asymmetric {usage} key")
        return record

    def material(self, key_id: str, version: int) -> bytes:
        sealed = self.env.store.key_material(key_id, version)
        if sealed is None:
            raise KmsError("KMS.2201", "Invalid cipher_text: unknown key version.")
        return self.env.master_key.open(sealed, material_context(key_id, version))

    def plaintext_reply(self, reply: dict, plaintext: bytes, **fields: str) -> dict:
        """``reply`` plus ``fields`` — or, for a recipient, plus ``ciphertext_recipient``."""
        if self.recipient is not None:
            return {**reply, "ciphertext_recipient": self.recipient.seal(plaintext)}
        return {**reply, **fields}


def material_context(key_id: str, version: int) -> str:
    return f"key:{key_id}:{version}"


@lru_cache(maxsize=256)
def _policy(text: str | None):
    return None if text is None else parse_policy(json.loads(text))


def _deleted(record: KeyRecord, now_ms: int) -> bool:
    return record.state == PENDING_DELETION and (record.deletion_ms or 0) <= now_ms


# --------------------------------------------------------------------------- field helpers


def _key_id(fields: Fields, name: str = "key_id") -> str:
    value = fields.text(name, max_length=36, code="KMS.0205")
    if not crypto.is_key_id(value):
        raise KmsError("KMS.0205", f"Invalid {name}: not a key id.")
    return value


def _aad(fields: Fields) -> bytes:
    text = fields.text("additional_authenticated_data", required=False, max_length=MAX_AAD)
    return (text or "").encode()


def _algorithm(fields: Fields) -> str:
    return fields.choice("encryption_algorithm", ("SYMMETRIC_DEFAULT", *asymmetric.ENCRYPTION_ALGORITHMS),
                         default="SYMMETRIC_DEFAULT") or "SYMMETRIC_DEFAULT"


def _bits(fields: Fields, name: str, code: str, default: int | None = None) -> int:
    given = fields.integer(name, required=default is None, low=8, high=8 * MAX_DATAKEY_BYTES,
                           code=code)
    bits = given if given is not None else default or 0
    if bits % 8:
        raise KmsError(code, f"Invalid {name}: must be a multiple of 8.")
    return bits


def _datakey_bits(fields: Fields, code: str) -> int:
    """The data key's length in bits: ``datakey_length`` when given (it wins over ``key_spec``,
    as Huawei's API reference says), else ``key_spec``'s, else 256."""
    spec = fields.choice("key_spec", ("AES_256", "AES_128"))
    if fields.has("datakey_length"):
        return _bits(fields, "datakey_length", code)
    return {"AES_256": 256, "AES_128": 128, None: 256}[spec]


# --------------------------------------------------------------------------- key management


#: Key specs with one possible usage (RSA keys may do either).
_ONLY_USAGE = {"AES_256": "ENCRYPT_DECRYPT", **{spec: "SIGN_VERIFY" for spec in asymmetric.EC_SPECS}}


def create_key(call: Call) -> dict:
    fields = call.fields
    alias = fields.text("key_alias", pattern=_ALIAS, max_length=255, code="KMS.1101")
    if alias.lower().endswith("/default"):
        raise KmsError("KMS.1101", "Invalid key_alias: the suffix /default is reserved.")
    description = fields.text("key_description", required=False, max_length=255,
                              code="KMS.1103") or ""
    spec = fields.choice("key_spec", ("AES_256", *asymmetric.SPECS), default="AES_256") or "AES_256"
    usage = fields.choice("key_usage", ("ENCRYPT_DECRYPT", "SIGN_VERIFY"),
                          default="SIGN_VERIFY" if asymmetric.is_asymmetric(spec) else "ENCRYPT_DECRYPT")
    if spec in _ONLY_USAGE and usage != _ONLY_USAGE[spec]:
        raise invalid("key_usage", f"a {spec} key is for {_ONLY_USAGE[spec]}")
    fields.choice("origin", ("kms",))
    fields.text("enterprise_project_id", required=False, max_length=36)
    fields.done()
    call.authorize(("kms:cmk:create",))
    record = KeyRecord(crypto.new_key_id(), call.project_id, alias, description, spec, usage or "",
                       ENABLED, call.env.now_ms(), None, 1)
    call.key_id = record.key_id
    secret = asymmetric.generate(spec) if asymmetric.is_asymmetric(spec) else os.urandom(crypto.KEY_SIZE)
    material = call.env.master_key.seal(secret, material_context(record.key_id, 1))
    try:
        call.env.store.create_key(record, material)
    except Conflict:
        raise KmsError("KMS.1104") from None
    return {"key_info": {"key_id": record.key_id, "domain_id": call.env.domain_id,
                         "region_id": call.env.region}}


def describe_key(call: Call) -> dict:
    key_id = _key_id(call.fields)
    call.fields.done()
    call.authorize(("kms:cmk:get",), key_id)
    return {"key_info": key_info(call.env, call.key(key_id))}


def list_keys(call: Call) -> dict:
    fields = call.fields
    limit = fields.integer("limit", required=False, low=1, high=1000, code="KMS.1601") or 1000
    offset = fields.integer("marker", required=False, low=0, high=10**9, code="KMS.1602") or 0
    state = fields.choice("key_state", _KEY_STATES)
    fields.text("key_spec", required=False, max_length=32)
    fields.text("enterprise_project_id", required=False, max_length=36)
    fields.done()
    call.authorize(("kms:cmk:list",))
    call.env.store.purge_deleted(call.env.now_ms())
    records, total = call.env.store.list_keys(call.project_id, offset=offset, limit=limit,
                                              state=state)
    truncated = offset + len(records) < total
    return {
        "keys": [record.key_id for record in records],
        "key_details": [key_info(call.env, record) for record in records],
        "next_marker": str(offset + len(records)) if truncated else "",
        "truncated": "true" if truncated else "false",
        "total": total,
    }


def key_info(env: Environment, record: KeyRecord) -> dict:
    """Huawei's key_info for describe-key / list-keys."""
    return {
        "key_id": record.key_id, "domain_id": env.domain_id, "key_alias": record.alias,
        "realm": env.region, "key_description": record.description,
        "creation_date": str(record.created_ms),
        "scheduled_deletion_date": "" if record.deletion_ms is None else str(record.deletion_ms),
        "key_state": record.state, "default_key_flag": "0", "key_type": "1",
        "expiration_time": "", "origin": "kms", "key_rotation_enabled": "false",
        "key_spec": record.key_spec, "key_usage": record.key_usage,
    }


def _transition(call: Call, action: str, change) -> KeyRecord:
    key_id = _key_id(call.fields)
    call.fields.done()
    call.authorize((action,), key_id)
    call.key(key_id)
    record = call.env.store.change_state(call.project_id, key_id, change)
    if record is None:
        raise KmsError("KMS.0207")
    return record


def enable_key(call: Call) -> dict:
    def change(record: KeyRecord):
        if record.state != DISABLED:
            raise KmsError("KMS.1201")
        return ENABLED, None

    record = _transition(call, "kms:cmk:enable", change)
    return {"key_info": {"key_id": record.key_id, "key_state": record.state}}


def disable_key(call: Call) -> dict:
    def change(record: KeyRecord):
        if record.state != ENABLED:
            raise KmsError("KMS.1301")
        return DISABLED, None

    record = _transition(call, "kms:cmk:disable", change)
    return {"key_info": {"key_id": record.key_id, "key_state": record.state}}


def schedule_key_deletion(call: Call) -> dict:
    days = call.fields.integer("pending_days", low=7, high=1096, code="KMS.1401")
    deletion_ms = call.env.now_ms() + days * _DAY_MS

    def change(record: KeyRecord):
        if record.state == PENDING_DELETION:
            raise KmsError("KMS.1402")
        return PENDING_DELETION, deletion_ms

    record = _transition(call, "kms:cmk:update", change)
    return {"key_id": record.key_id, "key_state": record.state}


def cancel_key_deletion(call: Call) -> dict:
    def change(record: KeyRecord):
        if record.state != PENDING_DELETION:
            raise KmsError("KMS.1501")
        return DISABLED, None

    record = _transition(call, "kms:cmk:update", change)
    return {"key_id": record.key_id, "key_state": record.state}


# --------------------------------------------------------------------------- data


def encrypt_data(call: Call) -> dict:
    fields = call.fields
    key_id = _key_id(fields)
    plaintext = _plaintext(fields)
    aad = _aad(fields)
    algorithm = _algorithm(fields)
    fields.done()
    call.authorize(("kms:cmk:encrypt",), key_id)
    if algorithm in asymmetric.ENCRYPTION_ALGORITHMS:
        record = call.asymmetric_key(key_id, "ENCRYPT_DECRYPT")
        ciphertext = asymmetric.encrypt(call.material(key_id, record.version), algorithm, plaintext)
    else:
        record = call.symmetric_key(key_id)
        ciphertext = crypto.encrypt(crypto.KIND_DATA, key_id, record.version,
                                    call.material(key_id, record.version), plaintext, aad)
    return {"key_id": key_id, "cipher_text": base64.b64encode(ciphertext).decode("ascii")}


def _plaintext(fields: Fields) -> bytes:
    """``plain_text`` (UTF-8 text) or ``plain_text_base64`` (binary): 1..4096 bytes."""
    if fields.has("plain_text_base64"):
        data = fields.base64("plain_text_base64", max_bytes=MAX_PLAINTEXT)
        if fields.has("plain_text"):
            raise invalid("plain_text", "give plain_text or plain_text_base64, not both")
    else:
        data = fields.text("plain_text", min_length=1, max_length=MAX_PLAINTEXT).encode()
    if not 1 <= len(data) <= MAX_PLAINTEXT:
        raise invalid("plain_text", f"must be 1..{MAX_PLAINTEXT} bytes")
    return data


def decrypt_data(call: Call) -> dict:
    fields = call.fields
    limit = crypto.TRAILER_SIZE + crypto.TAG_SIZE + MAX_PLAINTEXT
    ciphertext = fields.base64("cipher_text", max_bytes=limit, code="KMS.2201")
    aad = _aad(fields)
    algorithm = _algorithm(fields)
    claimed = _key_id(fields) if fields.has("key_id") else None
    fields.done()
    if algorithm in asymmetric.ENCRYPTION_ALGORITHMS:
        if claimed is None:
            raise KmsError("KMS.0204", f"The request lacks key_id (needed with {algorithm}).")
        call.authorize(("kms:cmk:decrypt",), claimed)
        record = call.asymmetric_key(claimed, "ENCRYPT_DECRYPT")
        plaintext = asymmetric.decrypt(call.material(claimed, record.version), algorithm, ciphertext)
        return call.plaintext_reply({"key_id": claimed}, plaintext, **_text_fields(plaintext))
    header = crypto.parse(ciphertext, crypto.KIND_DATA)
    if claimed is not None and claimed != header.key_id:
        raise KmsError("KMS.2201", "Invalid cipher_text: it belongs to another key.")
    call.authorize(("kms:cmk:decrypt",), header.key_id)
    call.symmetric_key(header.key_id)
    plaintext = crypto.decrypt(ciphertext, header, call.material(header.key_id, header.version),
                               aad)
    return call.plaintext_reply({"key_id": header.key_id}, plaintext,
                                **_text_fields(plaintext))


def _text_fields(plaintext: bytes) -> dict:
    reply = {"plain_text_base64": base64.b64encode(plaintext).decode("ascii")}
    with contextlib.suppress(UnicodeDecodeError):
        reply["plain_text"] = plaintext.decode("utf-8")
    return reply


# --------------------------------------------------------------------------- data keys


def _new_datakey(call: Call, code: str) -> tuple[str, bytes, str]:
    fields = call.fields
    key_id = _key_id(fields)
    bits = _datakey_bits(fields, code)
    aad = _aad(fields)
    fields.done()
    call.authorize(("kms:dek:create", "kms:cmk:createDataKey"), key_id)
    record = call.symmetric_key(key_id)
    datakey = os.urandom(bits // 8)
    ciphertext = crypto.encrypt(crypto.KIND_DATAKEY, key_id, record.version,
                                call.material(key_id, record.version), datakey, aad)
    return key_id, datakey, ciphertext.hex()


def create_datakey(call: Call) -> dict:
    key_id, datakey, cipher_text = _new_datakey(call, "KMS.1901")
    return call.plaintext_reply({"key_id": key_id, "cipher_text": cipher_text}, datakey,
                                plain_text=datakey.hex())


def create_datakey_without_plaintext(call: Call) -> dict:
    key_id, _, cipher_text = _new_datakey(call, "KMS.2001")
    return {"key_id": key_id, "cipher_text": cipher_text}


def encrypt_datakey(call: Call) -> dict:
    fields = call.fields
    key_id = _key_id(fields)
    given = fields.hex("plain_text", max_bytes=MAX_DATAKEY_BYTES + 32, code="KMS.2101")
    length = fields.integer("datakey_plain_length", low=1, high=MAX_DATAKEY_BYTES,
                            code="KMS.2102")
    aad = _aad(fields)
    fields.done()
    datakey = _checked_datakey(given, length)
    call.authorize(("kms:dek:encrypt", "kms:dek:crypto"), key_id)
    record = call.symmetric_key(key_id)
    ciphertext = crypto.encrypt(crypto.KIND_DATAKEY, key_id, record.version,
                                call.material(key_id, record.version), datakey, aad)
    return {"key_id": key_id, "cipher_text": ciphertext.hex(), "datakey_length": str(length)}


def _checked_datakey(given: bytes, length: int) -> bytes:
    """Huawei's ``plain_text``: the key followed by its SHA-256 (the bare key is accepted)."""
    if len(given) == length:
        return given
    if len(given) != length + 32:
        raise KmsError("KMS.2102", f"Invalid datakey_plain_length: plain_text holds "
                                   f"{len(given)} bytes, not {length} (+ 32 of SHA-256).")
    datakey, digest = given[:length], given[length:]
    if hashlib.sha256(datakey).digest() != digest:
        raise KmsError("KMS.2103")
    return datakey


def decrypt_datakey(call: Call) -> dict:
    fields = call.fields
    key_id = _key_id(fields)
    limit = crypto.TRAILER_SIZE + crypto.TAG_SIZE + MAX_DATAKEY_BYTES
    ciphertext = fields.hex("cipher_text", max_bytes=limit, code="KMS.2201")
    # Huawei documents 1..1024 with "the value is 64"; the ciphertext carries its own length,
    # so any value in range is accepted, as the real service does.
    fields.integer("datakey_cipher_length", low=1, high=MAX_DATAKEY_BYTES, code="KMS.2202")
    aad = _aad(fields)
    fields.done()
    header = crypto.parse(ciphertext, crypto.KIND_DATAKEY)
    if header.key_id != key_id:
        raise KmsError("KMS.2201", "Invalid cipher_text: it belongs to another key.")
    call.authorize(("kms:dek:decrypt",), key_id)
    call.symmetric_key(key_id)
    datakey = crypto.decrypt(ciphertext, header, call.material(key_id, header.version), aad)
    return call.plaintext_reply({"datakey_length": str(len(datakey))}, datakey,
                                data_key=datakey.hex(),
                                datakey_dgst=hashlib.sha256(datakey).hexdigest())


def gen_random(call: Call) -> dict:
    bits = _bits(call.fields, "random_data_length", "KMS.1801")
    call.fields.done()
    call.authorize(("kms:cmk:generate",))
    data = os.urandom(bits // 8)
    return call.plaintext_reply({}, data, random_data=data.hex())


# --------------------------------------------------------------------------- aliases


def _alias_reply(call: Call, record: AliasRecord) -> dict:
    return {"domain_id": call.env.domain_id, "key_id": record.key_id, "alias": record.alias,
            "alias_urn": f"kms:{call.env.region}:{call.env.domain_id}:{record.alias}",
            "create_time": str(record.created_ms), "update_time": str(record.updated_ms)}


def _alias(fields: Fields, name: str = "alias") -> str:
    return fields.text(name, pattern=_ALIAS, max_length=255, code="KMS.1101") or ""


def _put_alias(call: Call, key_field: str, action: str, *, create: bool) -> dict:
    """create-alias (a new alias) or associate-alias (an existing one, to another key)."""
    fields = call.fields
    alias, key_id = _alias(fields), _key_id(fields, key_field)
    fields.done()
    call.authorize((action,), key_id)
    call.key(key_id)
    try:
        record = call.env.store.put_alias(call.project_id, alias, key_id, call.env.now_ms(), create=create)
    except Conflict:
        raise KmsError("KMS.1104", f"The alias {alias} exists.") from None
    except KeyError:
        raise KmsError("KMS.1101", f"Invalid alias: {alias} does not exist.") from None
    return _alias_reply(call, record)


def create_alias(call: Call) -> dict:
    return _put_alias(call, "key_id", "kms:alias:create", create=True)


def associate_alias(call: Call) -> dict:
    return _put_alias(call, "target_key_id", "kms:alias:associate", create=False)


def list_aliases(call: Call) -> dict:
    fields = call.fields
    key_id = _key_id(fields) if fields.has("key_id") else None
    limit = fields.integer("limit", required=False, low=1, high=1000, code="KMS.1601") or 100
    offset = fields.integer("marker", required=False, low=0, high=10**9, code="KMS.1602") or 0
    fields.done()
    call.authorize(("kms:alias:list",), key_id)
    records = call.env.store.aliases(call.project_id, key_id=key_id, offset=offset, limit=limit + 1)
    more = len(records) > limit
    records = records[:limit]
    return {"aliases": [_alias_reply(call, record) for record in records],
            "page_info": {"next_marker": str(offset + limit) if more else "", "current_count": len(records)}}


def delete_alias(call: Call) -> dict:
    fields = call.fields
    key_id = _key_id(fields)
    aliases = fields.raw("aliases")
    if not isinstance(aliases, list) or not 1 <= len(aliases) <= 100 or not all(
            isinstance(alias, str) and _ALIAS.fullmatch(alias) for alias in aliases):
        raise KmsError("KMS.1101", "Invalid aliases: a list of 1..100 aliases.")
    fields.done()
    call.authorize(("kms:alias:delete",), key_id)
    missing = call.env.store.delete_aliases(call.project_id, key_id, aliases)
    if missing:
        raise KmsError("KMS.1101", f"Invalid aliases: {missing[0]} does not name key {key_id}.")
    return {}


def update_key_alias(call: Call) -> dict:
    key_id = _key_id(call.fields)
    alias = _alias(call.fields, "key_alias")
    if alias.lower().endswith("/default"):
        raise KmsError("KMS.1101", "Invalid key_alias: the suffix /default is reserved.")
    call.fields.done()
    call.authorize(("kms:cmk:update",), key_id)
    call.key(key_id)
    try:
        call.env.store.set_key_alias(call.project_id, key_id, alias)
    except Conflict:
        raise KmsError("KMS.1104") from None
    return {"key_info": {"key_id": key_id, "key_alias": alias}}


# --------------------------------------------------------------------------- asymmetric keys


def _signing(call: Call) -> tuple[str, str, bytes, str]:
    fields = call.fields
    key_id = _key_id(fields)
    message = fields.base64("message", max_bytes=MAX_PLAINTEXT)
    if not message:
        raise invalid("message", "must not be empty")
    algorithm = fields.choice("signing_algorithm", asymmetric.SIGNING_ALGORITHMS, required=True)
    message_type = fields.choice("message_type", ("DIGEST", "RAW"), default="DIGEST")
    return key_id, algorithm or "", message, message_type or "DIGEST"


def sign(call: Call) -> dict:
    key_id, algorithm, message, message_type = _signing(call)
    call.fields.done()
    call.authorize(("kms:cmk:sign",), key_id)
    record = call.asymmetric_key(key_id, "SIGN_VERIFY")
    signature = asymmetric.sign(call.material(key_id, record.version), record.key_spec, algorithm, message,
                                message_type)
    return {"key_id": key_id, "signature": base64.b64encode(signature).decode("ascii")}


def verify(call: Call) -> dict:
    key_id, algorithm, message, message_type = _signing(call)
    signature = call.fields.base64("signature", max_bytes=1024)
    call.fields.done()
    call.authorize(("kms:cmk:verify",), key_id)
    record = call.asymmetric_key(key_id, "SIGN_VERIFY")
    valid = asymmetric.verify(call.material(key_id, record.version), record.key_spec, algorithm, message,
                              message_type, signature or b"")
    return {"key_id": key_id, "signature_valid": "true" if valid else "false"}


def _datakey_pair(call: Call, specs: tuple[str, ...]) -> dict:
    """A new key pair: the public key, the private key sealed under the CMK (decrypt-data
    opens it), and — unless with_plain_text is false — the private key in plaintext (for a
    recipient: only inside ciphertext_recipient)."""
    fields = call.fields
    key_id = _key_id(fields)
    spec = fields.choice("key_spec", specs, required=True) or specs[0]
    with_plain_text = fields.flag("with_plain_text", default=True)
    aad = _aad(fields)
    fields.done()
    call.authorize(("kms:dek:create", "kms:cmk:createDataKeyPair"), key_id)
    record = call.symmetric_key(key_id)
    private = asymmetric.generate(spec)
    sealed = crypto.encrypt(crypto.KIND_DATA, key_id, record.version, call.material(key_id, record.version),
                            private, aad)
    reply = {"key_id": key_id, "key_spec": spec, "public_key": asymmetric.public_pem(private),
             "private_key_cipher_text": base64.b64encode(sealed).decode("ascii")}
    if not with_plain_text and call.recipient is None:
        return reply
    return call.plaintext_reply(reply, private, private_key_plain_text=base64.b64encode(private).decode("ascii"))


def create_rsa_datakey_pair(call: Call) -> dict:
    return _datakey_pair(call, tuple(asymmetric.RSA_SPECS))


def create_ec_datakey_pair(call: Call) -> dict:
    return _datakey_pair(call, tuple(asymmetric.EC_SPECS))


def get_public_key(call: Call) -> dict:
    key_id = _key_id(call.fields)
    call.fields.done()
    call.authorize(("kms:cmk:getPublicKey",), key_id)
    record = call.key(key_id)
    if not asymmetric.is_asymmetric(record.key_spec):
        raise invalid("key_id", f"{key_id} is a symmetric key: it has no public key")
    return {"key_id": key_id, "public_key": asymmetric.public_pem(call.material(key_id, record.version))}


# --------------------------------------------------------------------------- admin


def create_principal(call: Call) -> dict:
    fields = call.fields
    name = fields.text("name", pattern=_NAME, max_length=64)
    admin = fields.flag("admin")
    fields.done()
    call.authorize_admin()
    access_key, secret_key = new_principal(call.env, name, admin=admin)
    return {"name": name, "access_key": access_key, "secret_key": secret_key, "admin": admin}


def new_principal(env: Environment, name: str, *, admin: bool = False,
                  policy: dict | None = None) -> tuple[str, str]:
    """Create a principal; (access key, secret key).  KMS.0308 when the name is taken."""
    access_key = "".join(secrets.choice(string.ascii_uppercase + string.digits)
                         for _ in range(20))
    secret_key = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    sealed = env.master_key.seal(secret_key.encode(), principal_context(access_key))
    text = None if policy is None else json.dumps(policy, sort_keys=True)
    try:
        env.store.create_principal(
            PrincipalRecord(access_key, name, sealed, admin, env.now_ms(), text))
    except Conflict:
        raise invalid("name", f"a principal named {name} exists") from None
    return access_key, secret_key


def principal_context(access_key: str) -> str:
    return f"principal:{access_key}"


def _target(call: Call) -> PrincipalRecord:
    """The principal an admin call names, by ``access_key`` or ``name``."""
    fields = call.fields
    access_key = fields.text("access_key", required=False, pattern=_ACCESS_KEY, max_length=20)
    name = fields.text("name", required=False, pattern=_NAME, max_length=64)
    if (access_key is None) == (name is None):
        raise invalid("access_key", "give access_key or name")
    store = call.env.store
    if access_key:
        record = store.principal(access_key)
    else:
        assert name is not None  # exactly one of the two was given
        record = store.principal_named(name)
    if record is None:
        raise KmsError("KMS.0308", "Invalid access_key: no such principal.")
    return record


def put_policy(call: Call) -> dict:
    document = call.fields.object("policy", required=True)
    target = _target(call)
    call.fields.done()
    call.authorize_admin()
    try:
        parse_policy(document)
    except PolicyError as error:
        raise invalid("policy", str(error)) from None
    call.env.store.set_policy(target.access_key, document)
    return {"access_key": target.access_key, "name": target.name, "policy": document}


def get_policy(call: Call) -> dict:
    target = _target(call)
    call.fields.done()
    call.authorize_admin()
    policy = None if target.policy is None else json.loads(target.policy)
    return {"access_key": target.access_key, "name": target.name, "policy": policy}


def _duration(fields: Fields, low: int) -> int:
    return fields.integer("duration_seconds", required=False, low=low, high=credentials.MAX_SECONDS) \
        or credentials.MIN_SECONDS


def create_temporary_credentials(call: Call) -> dict:
    """IAM-style temporary AK/SK + security token acting as a principal."""
    target = _target(call)
    seconds = _duration(call.fields, credentials.MIN_SECONDS)
    call.fields.done()
    call.authorize_admin()
    return credentials.issue_temporary(call.env, target, seconds)


def create_token(call: Call) -> dict:
    """An X-Auth-Token acting as a principal."""
    target = _target(call)
    seconds = _duration(call.fields, credentials.MIN_TOKEN_SECONDS)
    call.fields.done()
    call.authorize_admin()
    return credentials.issue_token(call.env, target, seconds)


def list_principals(call: Call) -> dict:
    call.fields.done()
    call.authorize_admin()
    return {"principals": [
        {"access_key": record.access_key, "name": record.name, "admin": record.admin,
         "created": record.created_ms, "has_policy": record.policy is not None}
        for record in call.env.store.principals()]}


def list_audit(call: Call) -> dict:
    fields = call.fields
    after = fields.integer("marker", required=False, low=0, high=2**62, code="KMS.1602") or 0
    limit = fields.integer("limit", required=False, low=1, high=1000, code="KMS.1601") or 100
    principal = fields.text("principal", required=False, max_length=64)
    key_id = fields.text("key_id", required=False, max_length=36)
    decision = fields.choice("decision", ("allow", "deny", "error"))
    fields.done()
    call.authorize_admin()
    records = call.env.audit().records(after=after, limit=limit, principal=principal,
                                       key_id=key_id, decision=decision)
    marker = str(records[-1].id) if len(records) == limit else ""
    return {"records": [record.as_json() for record in records], "next_marker": marker}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Api:
    handler: Callable[[Call], dict]
    takes_recipient: bool = False
    replay_guarded: bool = False    # a mutating admin API: each signed request serves once


APIS: dict[str, Api] = {
    "create-key": Api(create_key),
    "list-keys": Api(list_keys),
    "describe-key": Api(describe_key),
    "enable-key": Api(enable_key),
    "disable-key": Api(disable_key),
    "schedule-key-deletion": Api(schedule_key_deletion),
    "cancel-key-deletion": Api(cancel_key_deletion),
    "encrypt-data": Api(encrypt_data),
    "decrypt-data": Api(decrypt_data, takes_recipient=True),
    "create-datakey": Api(create_datakey, takes_recipient=True),
    "create-datakey-without-plaintext": Api(create_datakey_without_plaintext),
    "encrypt-datakey": Api(encrypt_datakey),
    "decrypt-datakey": Api(decrypt_datakey, takes_recipient=True),
    "gen-random": Api(gen_random, takes_recipient=True),
    "create-alias": Api(create_alias),
    "list-aliases": Api(list_aliases),
    "delete-alias": Api(delete_alias),
    "associate-alias": Api(associate_alias),
    "update-key-alias": Api(update_key_alias),
    "create-rsa-datakey-pair": Api(create_rsa_datakey_pair, takes_recipient=True),
    "create-ec-datakey-pair": Api(create_ec_datakey_pair, takes_recipient=True),
    "sign": Api(sign),
    "verify": Api(verify),
    "get-publickey": Api(get_public_key),
    "admin/create-principal": Api(create_principal, replay_guarded=True),
    "admin/list-principals": Api(list_principals),
    "admin/create-temporary-credentials": Api(create_temporary_credentials, replay_guarded=True),
    "admin/create-token": Api(create_token, replay_guarded=True),
    "admin/put-policy": Api(put_policy, replay_guarded=True),
    "admin/get-policy": Api(get_policy),
    "admin/list-audit": Api(list_audit),
}
