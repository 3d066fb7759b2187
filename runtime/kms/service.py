"""The request pipeline, independent of HTTP framing: route → authenticate → decode JSON →
verify the recipient → run the API (which authorizes) → audit → reply.

``KmsService.serve(Request) -> Response`` never raises: refusals become Huawei-style error
bodies with their status, anything unexpected a logged ``500 KMS.0101`` without details.  Every
authenticated request is recorded in the audit log (fsynced before the reply), refused ones
included; unauthenticated refusals are counted and sampled (``refusals``).  A record holds
time, request id, peer address, principal, API, key, decision ("allow", "deny" for 401/403 and
refused attestation documents, "error" for other failures) with its reason, status, error
code, and the attested PCR0 / PCR8.

Paths: ``POST /v1.0/{project_id}/kms/{api}`` with the APIs of ``qtbuild.runtime.kms.operations``
(``{api}`` may be ``admin/<name>``).  Request bodies: one JSON object, at most
``MAX_JSON_DEPTH`` levels deep, without duplicate keys or NaN/Infinity; an empty body is ``{}``
(the official SDK sends list-keys without one).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from concurrent.futures import Future, wait
from dataclasses import dataclass
from urllib.parse import parse_qsl

from qtbuild.runtime.kms import aws, aws_sigv4
from qtbuild.runtime.kms.auth import WINDOW, authenticate, parse_authorization
from qtbuild.runtime.kms.credentials import check_temporary, temporary_secret, token_principal
from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.fields import Fields
from qtbuild.runtime.kms.operations import APIS, Call, Environment, principal_context
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.refusals import RefusalSampler
from qtbuild.runtime.kms.store import AuditRecord, PrincipalRecord, TemporaryCredential

log = logging.getLogger("qtbuild.kms")

MAX_JSON_DEPTH = 8
_PATH = re.compile(r"/v1\.0/([A-Za-z0-9_-]{1,64})/kms/([a-z-]{1,48}(?:/[a-z-]{1,48})?)")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]     # lower-case names
    body: bytes
    remote: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    body: dict
    request_id: str


class KmsService:
    """The KMS behind any transport."""

    def __init__(self, env: Environment, verifier: RecipientVerifier) -> None:
        self.env, self.verifier = env, verifier
        self.audit_log = env.audit()
        self.refusals = RefusalSampler(self._write_sample)

    def serve(self, request: Request) -> Response:
        """The response, once the request's audit record is durable."""
        response, durable = self.handle(request)
        if durable is not None:
            wait([durable])     # a failure was logged (_audit); the reply stands
        return response

    def handle(self, request: Request) -> tuple[Response, Future[None] | None]:
        """The response and the future of its audit record's commit: the caller sends the
        response only once that future is done (None: nothing to wait for — unauthenticated
        refusals are only sampled)."""
        request_id = uuid.uuid4().hex
        trace = _Trace(api=None, principal=None, call=None)
        error: KmsError | None = None
        amazon = aws.is_aws(request.path, request.headers)
        try:
            body = self._run_aws(request, trace) if amazon else self._run(request, trace)
        except KmsError as refusal:
            error = refusal
        except Exception:  # a service answers; details go to the log only
            log.exception("request %s failed", request_id)
            error = KmsError("KMS.0101")
        durable = self._audit(request, request_id, trace, error)
        if error is not None and amazon:
            status, body = aws.error_body(error)
            return Response(status, body, request_id), durable
        if error is not None:
            return Response(error.status, error.body(request_id), request_id), durable
        return Response(200, body, request_id), durable

    def runs_inline(self, request: Request) -> bool:
        """Whether serving ``request`` is quick CPU work and store reads only (no store write
        but its audit record, no key-pair generation): a data-plane cryptographic API.  An
        event-loop transport may then call :meth:`handle` on its loop instead of a thread."""
        if aws.is_aws(request.path, request.headers):
            return request.headers["x-amz-target"][len(aws.TARGET_PREFIX):] in _INLINE_AWS
        return request.method == "POST" and request.path.rpartition("/kms/")[2] in _INLINE_APIS

    def count_refusal(self, error: KmsError, remote: str | None) -> None:
        """Count (and sample into the audit log) a request the transport refused unread."""
        request = Request("-", "-", "", {}, b"", remote)
        self._audit(request, uuid.uuid4().hex, _Trace(None, None, None), error)

    def flush(self) -> None:
        """Write the audit sample still pending and wait for every queued record (the server
        is stopping)."""
        self.refusals.flush()
        self.audit_log.flush()

    # ------------------------------------------------------------------ the pipeline

    def _run(self, request: Request, trace: _Trace) -> dict:
        project_id, api_name = route(request.method, request.path)
        trace.api = api_name
        api = APIS.get(api_name)
        if api is None:
            raise KmsError("KMS.0201", f"Unknown API {api_name}.")
        principal = self._authenticate(request)
        trace.principal = principal.name
        if api.replay_guarded:
            self._claim_nonce(request)
        if request.method == "GET":
            fields = Fields(dict(parse_qsl(request.query, keep_blank_values=True)))
        else:
            fields = Fields(decode_json(request.body) if request.body.strip() else {})
        call = trace.call = Call(self.env, principal, project_id, fields)
        if api.takes_recipient and fields.has("recipient"):
            call.recipient = self.verifier.verify(fields.raw("recipient"))
        reply = api.handler(call)
        if call.decision is None or not call.decision.allowed:
            raise AssertionError(f"{api_name} answered without authorizing")
        return reply

    def _run_aws(self, request: Request, trace: _Trace) -> dict:
        """An AWS KMS JSON-protocol request (``aws``)."""
        operation = request.headers["x-amz-target"][len(aws.TARGET_PREFIX):]
        handler = aws.OPERATIONS.get(operation)
        if handler is None or request.method != "POST":
            raise KmsError("KMS.0201", f"Unknown operation {operation[:64]}.")
        trace.api = aws.API_NAMES[operation]
        principal = self._principal_by_sigv4(request)
        trace.principal = principal.name
        body = decode_json(request.body) if request.body.strip() else {}
        if not isinstance(body, dict):
            raise KmsError("KMS.0202", "The request body must be a JSON object.")
        project_id = self.env.store.meta("project_id", lambda: "")
        call = trace.call = Call(self.env, principal, project_id, Fields({}))
        reply = handler(call, body, self.verifier.verify)
        if call.decision is None or not call.decision.allowed:
            raise AssertionError(f"{operation} answered without authorizing")
        return reply

    def _principal_by_sigv4(self, request: Request) -> PrincipalRecord:
        """The principal of a SigV4-signed request (temporary credentials carry their token in
        X-Amz-Security-Token, as AWS session credentials do)."""
        secret_of, found = self._secret_lookup()
        aws_sigv4.authenticate(request.method, request.path, request.query, request.headers, request.body,
                               secret_of)
        return self._checked(found, request.headers.get("x-amz-security-token"))

    def _secret_lookup(self):
        """(secret_of(access key), the principals it found): a principal's own AK/SK or
        temporary credentials acting as one."""
        found: list[tuple[PrincipalRecord, TemporaryCredential | None]] = []

        def secret_of(access_key: str) -> str | None:
            record = self.env.store.principal(access_key)
            if record is not None:
                found.append((record, None))
                return self.env.master_key.open(record.secret, principal_context(access_key)).decode()
            temporary = self.env.store.temporary_credential(access_key)
            owner = self.env.store.principal(temporary.principal) if temporary else None
            if temporary is None or owner is None:
                return None
            found.append((owner, temporary))
            return temporary_secret(self.env, temporary)

        return secret_of, found

    def _checked(self, found: list, security_token: str | None) -> PrincipalRecord:
        principal, temporary = found[0]
        if temporary is not None:
            check_temporary(self.env, temporary, security_token)
        return principal

    def _authenticate(self, request: Request) -> PrincipalRecord:
        """The principal a request acts as: by its AK/SK signature (a principal's own, or
        temporary credentials with their X-Security-Token), or by its X-Auth-Token."""
        headers = request.headers
        if "authorization" not in headers and "x-auth-token" in headers:
            return token_principal(self.env, headers["x-auth-token"])
        secret_of, found = self._secret_lookup()
        authenticate(request.method, request.path, request.query, headers, request.body, secret_of, now=None)
        return self._checked(found, headers.get("x-security-token"))

    def _claim_nonce(self, request: Request) -> None:
        """A mutating admin request is served once: its signature (which covers its date,
        path and body) is its nonce, kept in the store — shared by every process serving it —
        until the 15-minute date window has passed."""
        if "authorization" not in request.headers:
            raise KmsError("KMS.0307", "Access denied: admin changes need an AK/SK-signed request, not a token.")
        signature = parse_authorization(request.headers.get("authorization")).signature
        now_ms = self.env.now_ms()
        if not self.env.store.claim_nonce(signature, now_ms + 2 * int(WINDOW.total_seconds() * 1000), now_ms):
            raise KmsError("KMS.0304")

    def _write_sample(self, record: AuditRecord) -> None:
        """A refusal sample: written without waiting for it (its loss is logged)."""
        self.audit_log.submit(record).add_done_callback(functools.partial(_log_if_lost, record))

    def _audit(self, request: Request, request_id: str, trace: _Trace, error: KmsError | None,
               ) -> Future[None] | None:
        call = trace.call
        recipient = call.recipient if call else None
        record = AuditRecord(
            time_ms=self.env.now_ms(), request_id=request_id, remote=request.remote,
            principal=trace.principal, api=trace.api, key_id=call.key_id if call else None,
            decision=_decision(error), reason=_reason(call, error), status=error.status if error else 200,
            error_code=error.wire_code if error else None,
            pcr0=recipient.pcr_hex(0) if recipient else None,
            pcr8=recipient.pcr_hex(8) if recipient else None,
            encoding=recipient.document.encoding if recipient else None,
        )
        if trace.principal is None:
            self.refusals.add(record)
            return None
        durable = self.audit_log.submit(record)
        durable.add_done_callback(functools.partial(_log_if_lost, record))
        return durable


def _log_if_lost(record: AuditRecord, durable: Future[None]) -> None:
    """The reply stands when its audit record could not be written; the log says what was lost."""
    error = durable.exception()
    if error is not None:
        log.error("audit record lost (%s): %s", error, record)


#: data-plane APIs: store reads and cryptography only (KmsService.runs_inline)
_INLINE_APIS = frozenset({"encrypt-data", "decrypt-data", "create-datakey", "create-datakey-without-plaintext",
                          "encrypt-datakey", "decrypt-datakey", "gen-random"})
_INLINE_AWS = frozenset({"Encrypt", "Decrypt", "GenerateDataKey", "GenerateRandom"})


@dataclass
class _Trace:
    """What the audit needs to know about how far a request got."""

    api: str | None
    principal: str | None
    call: Call | None


#: (method, path after /kms/) of Huawei's REST-style alias APIs → the API's name.
_REST = {("POST", "aliases"): "create-alias", ("GET", "aliases"): "list-aliases",
         ("DELETE", "aliases"): "delete-alias", ("POST", "alias/associate"): "associate-alias"}


def route(method: str, path: str) -> tuple[str, str]:
    """(project id, API name) of a request path; KMS.0201 otherwise."""
    match = _PATH.fullmatch(path)
    if match is None:
        raise KmsError("KMS.0201", "Invalid request URL: expected /v1.0/{project_id}/kms/{api}.")
    name = _REST.get((method, match.group(2)))
    if name is not None:
        return match.group(1), name
    if method != "POST":
        raise KmsError("KMS.0201", f"Invalid request: {method} is not supported here, use POST.")
    return match.group(1), match.group(2)


def decode_json(body: bytes) -> object:
    """The JSON value of ``body``; KMS.0202 when malformed, duplicated or too deep."""
    try:
        value = json.loads(body, object_pairs_hook=_object, parse_constant=_constant)
    except (ValueError, RecursionError):
        raise KmsError("KMS.0202") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise KmsError("KMS.0202", f"The request nests JSON deeper than {MAX_JSON_DEPTH} levels.")
    return value


def _object(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in item)
    return deepest


def _decision(error: KmsError | None) -> str:
    if error is None:
        return "allow"
    if error.status in (401, 403) or error.code.startswith("KMS.40"):
        return "deny"
    return "error"


def _reason(call: Call | None, error: KmsError | None) -> str | None:
    if error is not None:
        return f"{error.code}: {error.message}"
    return call.decision.reason if call and call.decision else None
