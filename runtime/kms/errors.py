"""The KMS's one error type and its catalogue of codes.

Codes and meanings follow Huawei KMS's published error table where one exists (``KMS.0101``
…``KMS.2203``); the recipient/attestation refusals have no Huawei counterpart and use
``KMS.40xx``.  Every error reaches the client as HTTP ``status`` with the body
``{"error": {"error_code": code, "error_msg": message}}`` — except authentication failures,
which answer as Huawei's API gateway does (``GATEWAY_CODES``).
"""

from __future__ import annotations

# code: (HTTP status, default message)
CATALOGUE: dict[str, tuple[int, str]] = {
    "KMS.0101": (500, "KMS error."),
    "KMS.0102": (503, "The service is busy; try again."),
    "KMS.0201": (400, "Invalid request URL."),
    "KMS.0202": (400, "The JSON format of the request message is invalid."),
    "KMS.0203": (413, "The request message length has exceeded the upper limit."),
    "KMS.0204": (400, "The request message lacks required parameters."),
    "KMS.0205": (400, "Invalid key_id."),
    "KMS.0206": (400, "Invalid sequence."),
    "KMS.0207": (404, "The key does not exist."),
    "KMS.0209": (400, "The key has been disabled and cannot be used."),
    "KMS.0210": (400, "The key is in the Pending deletion status and cannot be used."),
    "KMS.0301": (401, "The request carries no valid SDK-HMAC-SHA256 authorization."),
    "KMS.0302": (401, "The request signature does not verify."),
    "KMS.0303": (401, "The request date is outside the allowed window."),
    "KMS.0305": (401, "The temporary credentials or token are invalid or expired."),
    # the API gateway's throttling (too many connections from one client)
    "APIGW.0308": (429, "The throttling threshold has been reached."),
    # local: a mutating admin request whose signature was already used (a replay)
    "KMS.0304": (401, "The request was already served; sign a new one."),
    "KMS.0306": (403, "The user has no permission to access the key."),
    "KMS.0307": (403, "The user has no permission to access the API."),
    "KMS.0308": (400, "Invalid parameter."),
    "KMS.1101": (400, "Invalid key_alias."),
    "KMS.1103": (400, "Invalid key_description."),
    "KMS.1104": (400, "Existing CMK alias."),
    "KMS.1201": (400, "The key is not disabled."),
    "KMS.1301": (400, "The key is not enabled."),
    "KMS.1401": (400, "The deletion of CMKs can be scheduled 7 to 1096 days in advance."),
    "KMS.1402": (400, "The key is in the Pending deletion status."),
    "KMS.1501": (400, "The key is not in the Pending deletion status."),
    "KMS.1601": (400, "The value of limit falls beyond the range."),
    "KMS.1602": (400, "Invalid marker."),
    "KMS.1801": (400, "Invalid random_data_length."),
    "KMS.1901": (400, "Invalid datakey_length."),
    "KMS.2001": (400, "Invalid datakey_length."),
    "KMS.2101": (400, "Invalid plain_text."),
    "KMS.2102": (400, "Invalid datakey_plain_length."),
    "KMS.2103": (400, "Hash verification of the data encryption key failed."),
    "KMS.2201": (400, "Invalid cipher_text."),
    "KMS.2202": (400, "Invalid datakey_cipher_length."),
    # recipient (attested) requests — local codes
    "KMS.4001": (400, "Invalid recipient."),
    "KMS.4002": (400, "The attestation document is malformed."),
    "KMS.4003": (400, "The attestation document does not chain to a trusted root."),
    "KMS.4004": (400, "A certificate of the attestation document is not valid now."),
    "KMS.4005": (400, "The attestation document's signature does not verify."),
    "KMS.4006": (400, "The attestation document is too old or from the future."),
    "KMS.4007": (400, "The attestation document comes from a debug-mode enclave."),
    "KMS.4008": (400, "The attestation document's public key is not an acceptable RSA key."),
}


#: Authentication failures: on Huawei Cloud the API gateway refuses these before KMS sees them,
#: with HTTP 401 and its own flat body ``{"error_msg", "error_code": "APIGW.0301",
#: "request_id"}``; the KMS.030x code stays in the audit log's reason.
GATEWAY_CODES = frozenset({"KMS.0301", "KMS.0302", "KMS.0303", "KMS.0305"})
GATEWAY_CODE = "APIGW.0301"
GATEWAY_MESSAGE = "Incorrect IAM authentication information"


class KmsError(Exception):
    """A refusal with a catalogued ``code``; ``status`` is the code's HTTP status."""

    def __init__(self, code: str, message: str | None = None) -> None:
        status, default = CATALOGUE[code]
        self.code, self.status, self.message = code, status, message or default
        super().__init__(f"{code}: {self.message}")

    @property
    def wire_code(self) -> str:
        """The code the client sees (APIGW.0301 for authentication failures)."""
        return GATEWAY_CODE if self.code in GATEWAY_CODES else self.code

    def body(self, request_id: str = "") -> dict:
        if self.code in GATEWAY_CODES:
            return {"error_msg": f"{GATEWAY_MESSAGE}: {self.message}", "error_code": GATEWAY_CODE,
                    "request_id": request_id}
        if self.code.startswith("APIGW."):
            return {"error_msg": self.message, "error_code": self.code, "request_id": request_id}
        return {"error": {"error_code": self.code, "error_msg": self.message}}


def invalid(field: str, why: str) -> KmsError:
    """KMS.0308 for a field of the wrong type, size or value."""
    return KmsError("KMS.0308", f"Invalid {field}: {why}.")


def missing(field: str) -> KmsError:
    return KmsError("KMS.0204", f"The request lacks the required parameter {field}.")
