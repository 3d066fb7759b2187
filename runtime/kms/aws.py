"""AWS KMS's JSON protocol on the same service (for ``--cloud nitro``): ``POST /`` with
``X-Amz-Target: TrentService.<Operation>``, SigV4-signed (``aws_sigv4``), answered in AWS's
shapes by translating to the Huawei-shaped operations (same keys, policies, audit).

Operations: Encrypt, Decrypt, GenerateDataKey, GenerateRandom (the last three with
``Recipient {AttestationDocument, KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256}`` → the reply's
``CiphertextForRecipient``, a CMS EnvelopedData), CreateKey, ListKeys, CreateAlias.  Key ids
may be ids, key ARNs or ``alias/…`` names.  ``EncryptionContext`` becomes the AAD (its
canonical JSON).  Policies may name AWS actions (``kms:Decrypt`` …) as well as Huawei's, and
AWS's condition keys (``kms:RecipientAttestation:ImageSha384``, ``:PCR<n>``).  Errors are
``{"__type", "message"}`` with AWS's exception names.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable

from qtbuild.runtime.kms import crypto
from qtbuild.runtime.kms.errors import KmsError, invalid
from qtbuild.runtime.kms.fields import Fields
from qtbuild.runtime.kms.operations import APIS, Call

TARGET_PREFIX = "TrentService."
ACCOUNT = "000000000000"
_MAX_CONTEXT = 128

#: KmsError code → (AWS exception name, HTTP status)
_EXCEPTIONS = {
    "KMS.0101": ("KMSInternalException", 500), "KMS.0102": ("ThrottlingException", 400),
    "KMS.0207": ("NotFoundException", 400), "KMS.0209": ("DisabledException", 400),
    "KMS.0210": ("KMSInvalidStateException", 400), "KMS.2201": ("InvalidCiphertextException", 400),
    "KMS.0306": ("AccessDeniedException", 400), "KMS.0307": ("AccessDeniedException", 400),
    "KMS.0301": ("IncompleteSignatureException", 400), "KMS.0302": ("InvalidSignatureException", 400),
    "KMS.0303": ("InvalidSignatureException", 400), "KMS.0305": ("UnrecognizedClientException", 400),
    "KMS.1104": ("AlreadyExistsException", 400), "KMS.0201": ("UnknownOperationException", 400),
}


def is_aws(path: str, headers: dict[str, str]) -> bool:
    return path == "/" and headers.get("x-amz-target", "").startswith(TARGET_PREFIX)


def error_body(error: KmsError) -> tuple[int, dict]:
    name, status = _EXCEPTIONS.get(error.code, ("ValidationException", 400))
    if error.code.startswith("KMS.40"):
        name = "InvalidCiphertextException" if error.code == "KMS.4001" else "ValidationException"
    return status, {"__type": name, "message": error.message}


def arn(call: Call, key_id: str) -> str:
    return f"arn:aws:kms:{call.env.region}:{ACCOUNT}:key/{key_id}"


def _key_ref(call: Call, body: dict, name: str = "KeyId") -> str:
    """A key id from an id, a key ARN or an alias (name or ARN)."""
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise KmsError("KMS.0204", f"The request lacks a valid {name}.")
    if "alias/" in value:
        alias = value[value.index("alias/"):]
        found = call.env.store.aliases(call.project_id, key_id=None, offset=0, limit=10**6)
        for record in found:
            if record.alias == alias:
                return record.key_id
        raise KmsError("KMS.0207", f"Alias {alias} is not found.")
    return value.rsplit("key/", 1)[-1]


def _context(body: dict) -> str | None:
    context = body.get("EncryptionContext")
    if context is None:
        return None
    if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
        raise invalid("EncryptionContext", "a map of strings")
    text = json.dumps(context, sort_keys=True, separators=(",", ":"))
    if len(text) > _MAX_CONTEXT:
        raise invalid("EncryptionContext", f"at most {_MAX_CONTEXT} characters here")
    return text


def _recipient(body: dict) -> dict | None:
    recipient = body.get("Recipient")
    if recipient is None:
        return None
    if not isinstance(recipient, dict) or set(recipient) - {"AttestationDocument", "KeyEncryptionAlgorithm"}:
        raise invalid("Recipient", "AttestationDocument and KeyEncryptionAlgorithm")
    return {"attestation_document": recipient.get("AttestationDocument"),
            "key_encryption_algorithm": recipient.get("KeyEncryptionAlgorithm")}


def _run(call: Call, api: str, fields: dict, also: tuple[str, ...], verify_recipient) -> dict:
    call.fields = Fields({name: value for name, value in fields.items() if value is not None})
    call.also = also
    recipient = call.fields.raw("recipient")
    if recipient is not None:
        call.recipient = verify_recipient(recipient)
    return APIS[api].handler(call)


def _plaintext_or_envelope(reply: dict, plain: str, out: dict) -> dict:
    if "ciphertext_recipient" in reply:
        out["CiphertextForRecipient"] = reply["ciphertext_recipient"]
    else:
        out["Plaintext"] = plain
    return out


def encrypt(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    reply = _run(call, "encrypt-data", {"key_id": key_id, "plain_text_base64": body.get("Plaintext"),
                                        "additional_authenticated_data": _context(body)}, ("kms:Encrypt",), verify)
    return {"CiphertextBlob": reply["cipher_text"], "KeyId": arn(call, key_id),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def _datakey_blob(body: dict) -> bytes | None:
    """The CiphertextBlob when it is a GenerateDataKey ciphertext (AWS's Decrypt takes both)."""
    text = body.get("CiphertextBlob")
    if not isinstance(text, str) or len(text) > 8192:
        return None
    try:
        blob = base64.b64decode(text, validate=True)
        crypto.parse(blob, crypto.KIND_DATAKEY)
    except (ValueError, KmsError):
        return None
    return blob


def decrypt(call: Call, body: dict, verify) -> dict:
    blob = _datakey_blob(body)
    if blob is not None:
        header = crypto.parse(blob, crypto.KIND_DATAKEY)
        reply = _run(call, "decrypt-datakey", {
            "key_id": header.key_id, "cipher_text": blob.hex(), "datakey_cipher_length": "64",
            "additional_authenticated_data": _context(body), "recipient": _recipient(body)}, ("kms:Decrypt",), verify)
        plain = base64.b64encode(bytes.fromhex(reply.get("data_key", ""))).decode("ascii")
        return _plaintext_or_envelope(reply, plain, {"KeyId": arn(call, header.key_id),
                                                     "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    fields = {"cipher_text": body.get("CiphertextBlob"), "additional_authenticated_data": _context(body),
              "recipient": _recipient(body)}
    if body.get("KeyId") is not None:
        fields["key_id"] = _key_ref(call, body)
    reply = _run(call, "decrypt-data", fields, ("kms:Decrypt",), verify)
    return _plaintext_or_envelope(reply, reply.get("plain_text_base64", ""), {
        "KeyId": arn(call, reply["key_id"]), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})


def generate_data_key(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    spec, count = body.get("KeySpec"), body.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise invalid("KeySpec", "give KeySpec or NumberOfBytes")
    if spec is not None and spec not in ("AES_256", "AES_128"):
        raise invalid("KeySpec", "AES_256 or AES_128")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024):
        raise invalid("NumberOfBytes", "1..1024")
    bits = 8 * count if count is not None else (256 if spec == "AES_256" else 128)
    reply = _run(call, "create-datakey", {"key_id": key_id, "datakey_length": bits,
                                          "additional_authenticated_data": _context(body),
                                          "recipient": _recipient(body)}, ("kms:GenerateDataKey",), verify)
    blob = base64.b64encode(bytes.fromhex(reply["cipher_text"])).decode("ascii")
    plain = base64.b64encode(bytes.fromhex(reply.get("plain_text", ""))).decode("ascii")
    return _plaintext_or_envelope(reply, plain, {"CiphertextBlob": blob, "KeyId": arn(call, key_id)})


def generate_random(call: Call, body: dict, verify) -> dict:
    count = body.get("NumberOfBytes")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        raise invalid("NumberOfBytes", "1..1024")
    reply = _run(call, "gen-random", {"random_data_length": 8 * count, "recipient": _recipient(body)},
                 ("kms:GenerateRandom",), verify)
    plain = base64.b64encode(bytes.fromhex(reply.get("random_data", ""))).decode("ascii")
    return _plaintext_or_envelope(reply, plain, {})


def create_key(call: Call, body: dict, verify) -> dict:
    spec = body.get("KeySpec") or body.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
    if spec != "SYMMETRIC_DEFAULT" or body.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":
        raise invalid("KeySpec", "only SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys on the AWS protocol")
    description = body.get("Description") or ""
    alias = f"aws-{secrets.token_hex(10)}"      # Huawei-shaped keys need a name; AWS keys have none
    fields = {"key_alias": alias, "key_description": description if isinstance(description, str) else None}
    reply = _run(call, "create-key", fields, ("kms:CreateKey",), verify)
    key_id = reply["key_info"]["key_id"]
    record = call.key(key_id)
    return {"KeyMetadata": {
        "AWSAccountId": ACCOUNT, "KeyId": key_id, "Arn": arn(call, key_id), "CreationDate": record.created_ms / 1000,
        "Enabled": True, "Description": description, "KeyUsage": "ENCRYPT_DECRYPT", "KeyState": "Enabled",
        "Origin": "AWS_KMS", "KeyManager": "CUSTOMER", "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "KeySpec": "SYMMETRIC_DEFAULT", "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"], "MultiRegion": False}}


def list_keys(call: Call, body: dict, verify) -> dict:
    fields = {"limit": body.get("Limit"), "marker": body.get("Marker")}
    reply = _run(call, "list-keys", fields, ("kms:ListKeys",), verify)
    out: dict = {"Keys": [{"KeyId": key_id, "KeyArn": arn(call, key_id)} for key_id in reply["keys"]],
                 "Truncated": reply["truncated"] == "true"}
    if reply["next_marker"]:
        out["NextMarker"] = reply["next_marker"]
    return out


def create_alias(call: Call, body: dict, verify) -> dict:
    name = body.get("AliasName")
    if not isinstance(name, str) or not name.startswith("alias/") or name.startswith("alias/aws/"):
        raise invalid("AliasName", "alias/<name>, not alias/aws/…")
    _run(call, "create-alias", {"key_id": _key_ref(call, body, "TargetKeyId"), "alias": name},
         ("kms:CreateAlias",), verify)
    return {}


OPERATIONS: dict[str, Callable] = {
    "Encrypt": encrypt, "Decrypt": decrypt, "GenerateDataKey": generate_data_key,
    "GenerateRandom": generate_random, "CreateKey": create_key, "ListKeys": list_keys,
    "CreateAlias": create_alias,
}

#: the Huawei API each operation runs (for the audit log)
API_NAMES = {"Encrypt": "encrypt-data", "Decrypt": "decrypt-data", "GenerateDataKey": "create-datakey",
             "GenerateRandom": "gen-random", "CreateKey": "create-key", "ListKeys": "list-keys",
             "CreateAlias": "create-alias"}
