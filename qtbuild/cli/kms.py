"""``qtbuild kms``: run the local KMS and administer it over HTTP.

``serve [--state-dir DIR] [--db FILE] [--listen HOST:PORT] [--attestation-root PEM …]
[--attestation-root-fingerprint SHA256 …] [--trust-hardware-roots] [--max-age 5m]
[--allow-debug] [--max-connections N] [--max-connections-per-client N] [--io-timeout S]
[--header-timeout S] [--body-timeout S] [--threads N] [--audit-max-bytes N] [--audit-keep N]
[--tls [--tls-name NAME …]]``
    Runs the service (runtime/kms) until SIGTERM/SIGINT.  On first start it creates the master
    key, the database and an admin principal; every start writes the admin credentials and the
    endpoint to ``<state-dir>/admin.json`` (0600).  Prints one JSON line on stdout:
    ``{"endpoint", "credentials", "project_id"}``.  Attestation documents are checked against the
    local PKI's root (when initialised) plus the given roots; ``--trust-hardware-roots`` adds
    the Nitro and QingTian roots.  ``--tls`` serves HTTPS with a certificate issued at start by
    the local TLS CA (``qtbuild pki export-tls-ca`` gives clients the CA to trust; the admin
    commands trust it themselves).

``backup FILE`` / ``restore FILE``
    A consistent online copy of the store (SQLite's backup API; sealed material stays sealed,
    the master key is not in it) / put one back (service stopped; older schemas upgraded).

``create-key``, ``encrypt``, ``principal create [--temporary --duration 15m]``,
``token create``, ``policy put|get|check``, ``audit``
    Admin commands: signed requests with the credentials of ``--credentials`` (default
    ``$QTBUILD_KMS_CREDENTIALS``, else the serve state directory's ``admin.json``) to its
    endpoint (or ``--endpoint``).  The policy language: docs/kms-policies.md.

Exit codes: 0 success, 1 the KMS refused (its code and message on stderr), 2 usage/input error.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import click

from qtbuild.cli.attest import parse_duration
from qtbuild.cli.attestation_options import measured_pcrs, pcr_hex, recipient_verifier
from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.errors import InputError
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json, say
from qtbuild.formats.bounded_input import load_json_object
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.kms.audit_log import DEFAULT_KEEP, DEFAULT_MAX_BYTES
from qtbuild.runtime.kms.recipient import DEFAULT_MAX_AGE
from qtbuild.runtime.kms.server import KmsHttpServer, quiet_parser_warnings, serve_until_signalled
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import (
    StatePaths,
    open_state,
    read_credentials,
    write_credentials,
)
from qtbuild.runtime.kms.state import (
    backup as backup_state,
)
from qtbuild.runtime.kms.state import (
    restore as restore_state,
)
from qtbuild.runtime.qtsm.pki import PkiError, default_state_dir
from qtbuild.runtime.qtsm.tls_ca import LocalTlsCa, local_tls_trust
from qtbuild.runtime.sdk.kms_client import Credentials, KmsClient, tcp_transport

MAX_INPUT = 4096
MAX_POLICY_FILE = 64 * 1024
CREDENTIALS_ENV = "QTBUILD_KMS_CREDENTIALS"


def _default_state_dir() -> Path:
    return default_state_dir() / "kms"


@click.group("kms", cls=QtbuildGroup)
def command() -> None:
    """A local KMS (Huawei KMS REST shapes) with attested-recipient decryption."""


# --------------------------------------------------------------------------- serve


@command.command("serve")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="KMS state directory (default: <qtbuild state dir>/kms).")
@click.option("--db", type=click.Path(dir_okay=False), help="SQLite file [<state-dir>/kms.sqlite].")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, metavar="HOST:PORT",
              help="Address to listen on (port 0: any free port).")
@click.option("--attestation-root", "root_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Trust this attestation root (PEM); repeatable.")
@click.option("--attestation-root-fingerprint", "fingerprints", multiple=True, metavar="SHA256",
              help="Trust the root with this SHA-256 fingerprint; repeatable.")
@click.option("--trust-hardware-roots", is_flag=True,
              help="Also trust the AWS Nitro and Huawei QingTian roots.")
@click.option("--no-local-root", is_flag=True, help="Do not trust the local PKI's root.")
@click.option("--max-age", default=None, metavar="DURATION",
              help=f"Oldest attestation document accepted [{DEFAULT_MAX_AGE:g}s].")
@click.option("--allow-debug", is_flag=True, help="Accept debug-mode enclaves' documents.")
@click.option("--max-connections", type=click.IntRange(1, 4096), default=256, show_default=True)
@click.option("--max-connections-per-client", "max_per_client", type=click.IntRange(1, 4096), default=64,
              show_default=True, help="Connections one IP address may hold (the next get 429).")
@click.option("--io-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a kept-alive connection may stay idle.")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a request's line and headers may take to arrive (then 408).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a request body may take to arrive (then 408).")
@click.option("--threads", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Threads running the requests other than the data-plane cryptographic ones (on the event loop).")
@click.option("--audit-max-bytes", type=click.IntRange(min=4096), default=DEFAULT_MAX_BYTES, show_default=True,
              help="Rotate the live audit records into an archive past this size (JSON bytes).")
@click.option("--audit-keep", type=click.IntRange(min=0), default=DEFAULT_KEEP, show_default=True,
              help="Archives kept in <state-dir>/audit/; older ones are deleted.")
@click.option("--tls", is_flag=True,
              help="Serve HTTPS with a certificate from the local TLS CA (qtbuild pki export-tls-ca).")
@click.option("--tls-name", "tls_names", multiple=True, metavar="NAME",
              help="With --tls: another DNS name or IP address for the certificate; repeatable "
                   "(always: the --listen host and localhost).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(state_dir, db, listen, root_paths, fingerprints, trust_hardware_roots, no_local_root,
          max_age, allow_debug, max_connections, max_per_client, io_timeout, header_timeout, body_timeout,
          threads, audit_max_bytes, audit_keep, tls, tls_names, verbose) -> None:
    """Run the KMS until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="qtbuild kms: %(levelname)s: %(message)s")
    quiet_parser_warnings(verbose)
    paths = StatePaths.under(state_dir or _default_state_dir(), db)
    verifier = recipient_verifier(root_paths, fingerprints, hardware=trust_hardware_roots, no_local=no_local_root,
                                  max_age=max_age, allow_debug=allow_debug)
    opened = open_state(paths, audit_max_bytes=audit_max_bytes, audit_keep=audit_keep)
    address = _address(listen)
    tls_files = _server_certificate(paths.directory, [address[0], "localhost", *tls_names]) if tls else None
    try:
        server = KmsHttpServer(address, KmsService(opened.env, verifier), io_timeout=io_timeout,
                               max_connections=max_connections, max_per_client=max_per_client,
                               header_timeout=header_timeout, body_timeout=body_timeout, threads=threads,
                               tls=tls_files)
    except OSError as exc:
        raise InputError(f"--listen {listen}: {exc.strerror or exc}") from None
    write_credentials(paths.credentials, server.endpoint, opened.admin)
    say(f"qtbuild kms: {'created' if opened.created else 'opened'} state in {paths.directory}")
    say(f"qtbuild kms: admin credentials in {paths.credentials}")
    say(f"qtbuild kms: listening on {server.endpoint} (project {opened.project_id}; "
        f"{len(verifier.roots) + len(verifier.root_fingerprints)} attestation root(s))")
    ready = json.dumps({"endpoint": server.endpoint, "credentials": str(paths.credentials),
                        "project_id": opened.project_id})
    serve_forever = server.serve_forever

    def announce_then_serve(*args, **kwargs):
        # The ready line goes out once serve_until_signalled has installed its signal handlers
        # (it starts this in its worker thread): a SIGTERM right after the line stops the
        # server cleanly instead of killing the process.
        click.echo(ready)
        sys.stdout.flush()
        return serve_forever(*args, **kwargs)

    server.serve_forever = announce_then_serve  # type: ignore[method-assign]
    serve_until_signalled(server)
    say("qtbuild kms: stopped")


def _server_certificate(state_dir: Path, names: list[str]) -> tuple[Path, Path]:
    """A fresh server certificate from the local TLS CA, written to ``<state-dir>/tls/``."""
    try:
        ca = LocalTlsCa.open()
        issued = ca.issue_server([name for name in names if name not in ("0.0.0.0", "::")])
    except (PkiError, ValueError) as exc:
        raise InputError(f"--tls: {exc}") from None
    directory = state_dir / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    chain, key = directory / "server.crt", directory / "server.key"
    write_atomically(key, issued.key_pem, 0o600)
    write_atomically(chain, issued.chain_pem, 0o644)
    say(f"qtbuild kms: TLS certificate for {', '.join(dict.fromkeys(names))} from the local TLS CA "
        f"({ca.certificate.subject.rfc4514_string()})")
    return chain, key


def _state_options(function):
    function = click.option("--db", type=click.Path(dir_okay=False),
                            help="SQLite file [<state-dir>/kms.sqlite].")(function)
    return click.option("--state-dir", type=click.Path(file_okay=False),
                        help="KMS state directory (default: <qtbuild state dir>/kms).")(function)


@command.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@_state_options
def backup_command(file, state_dir, db) -> None:
    """Write a consistent copy of the KMS store to FILE, also while it is serving (SQLite's
    online backup API).  Key material stays sealed: FILE is useless without master.key, which
    it does not contain — keep that apart."""
    paths = StatePaths.under(state_dir or _default_state_dir(), db)
    if not paths.database.exists():
        raise InputError(f"{paths.database}: no KMS store (run `qtbuild kms serve` first, or pass --state-dir)")
    if Path(file).exists():
        raise InputError(f"{file} exists: choose a new file")
    backup_state(paths, Path(file))  # StoreError / OSError: exit 2 through qtbuild.cli.domain_errors
    say(f"qtbuild kms: backed up {paths.database} to {file}")


@command.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_state_options
def restore_command(file, state_dir, db) -> None:
    """Replace the KMS store with the backup FILE (stop `qtbuild kms serve` first).  An older
    backup is upgraded; the state's master.key must be the one the backup was made with."""
    paths = StatePaths.under(state_dir or _default_state_dir(), db)
    restore_state(paths, Path(file))  # StoreError / MasterKeyError / OSError: exit 2 (qtbuild.cli.domain_errors)
    say(f"qtbuild kms: restored {paths.database} from {file}")


def _address(listen: str) -> tuple[str, int]:
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit() or int(port) > 65535 or not host:
        raise InputError(f"--listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- admin commands


def _admin_options(function):
    function = click.option("--endpoint", metavar="URL",
                            help="KMS endpoint (default: the credentials file's).")(function)
    return click.option("--credentials", "credentials_path", envvar=CREDENTIALS_ENV, show_envvar=True,
                        type=click.Path(dir_okay=False),
                        help="Admin credentials file [<qtbuild state dir>/kms/admin.json].",
                        )(function)


def _client(credentials_path: str | None, endpoint: str | None) -> KmsClient:
    """A client signing with the credentials file's keys, connected to its endpoint."""
    return _connection(credentials_path, endpoint)[0]


def _connection(credentials_path: str | None, endpoint: str | None) -> tuple[KmsClient, str]:
    path = credentials_path or str(_default_state_dir() / "admin.json")
    try:
        stored_endpoint, credentials = read_credentials(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no credentials (start `qtbuild kms serve` first, "
                         "or pass --credentials)") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None
    url = urlsplit(endpoint or stored_endpoint)
    if url.scheme not in ("http", "https") or not url.hostname or not url.port:
        raise InputError(f"endpoint {endpoint or stored_endpoint!r}: expected http(s)://HOST:PORT")
    context = local_tls_trust() if url.scheme == "https" else None
    client = KmsClient(tcp_transport(url.hostname, url.port), credentials, host=url.netloc, ssl_context=context)
    return client, url.geturl()


def _call(client: KmsClient, api: str, body: dict) -> dict:
    """The KMS's reply; a refusal (KmsClientError) is exit 1 with its code (qtbuild.cli.domain_errors)."""
    with client:
        return client.call(api, body)


@command.command("create-key")
@click.option("--alias", required=True, help="The key alias (letters, digits, : / _ -).")
@click.option("--description", default=None, help="Free text, ≤ 255 characters.")
@_admin_options
def create_key(alias, description, credentials_path, endpoint) -> None:
    """Create an AES-256 customer master key; prints key_info {key_id, domain_id, region_id}."""
    body = {"key_alias": alias}
    if description is not None:
        body["key_description"] = description
    emit_json(_call(_client(credentials_path, endpoint), "create-key", body)["key_info"])


@command.command("encrypt")
@click.option("--key-id", required=True, help="The customer master key.")
@click.option("--in", "input_path", required=True, type=click.Path(dir_okay=False,
              allow_dash=True), help="Plaintext file (1–4096 bytes; - for stdin).")
@click.option("--aad", default=None, help="additional_authenticated_data (≤ 128 characters).")
@click.option("--out", "output_path", type=click.Path(dir_okay=False),
              help="Write the base64 cipher_text here instead of printing JSON.")
@_admin_options
def encrypt(key_id, input_path, aad, output_path, credentials_path, endpoint) -> None:
    """encrypt-data: prints {key_id, cipher_text} (or writes cipher_text to --out)."""
    plaintext = _read_input(input_path)
    body = {"key_id": key_id, "plain_text_base64": _b64(plaintext)}
    if aad is not None:
        body["additional_authenticated_data"] = aad
    reply = _call(_client(credentials_path, endpoint), "encrypt-data", body)
    if output_path:
        write_atomically(output_path, (reply["cipher_text"] + "\n").encode(), 0o644)
    else:
        emit_json(reply)


def _read_input(path: str) -> bytes:
    data = read_bounded(path, MAX_INPUT, f"encrypt-data takes 1..{MAX_INPUT} bytes")
    if not data:
        raise InputError(f"{path}: empty: encrypt-data takes 1..{MAX_INPUT} bytes")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@command.group("principal")
def principal() -> None:
    """Principals: access key / secret key pairs that sign requests."""


@principal.command("create")
@click.argument("name")
@click.option("--admin", "is_admin", is_flag=True, help="May call the admin APIs.")
@click.option("--temporary", is_flag=True,
              help="Issue temporary credentials (AK/SK + security token) for the existing principal NAME.")
@click.option("--duration", default="15m", show_default=True, metavar="DURATION",
              help="With --temporary: how long they stay valid (15m .. 24h).")
@click.option("--out", "output_path", type=click.Path(dir_okay=False),
              help="Also write a credentials file (0600) for this principal.")
@_admin_options
def principal_create(name, is_admin, temporary, duration, output_path, credentials_path, endpoint) -> None:
    """Create a principal; prints its access key and secret key (shown only now).  With
    --temporary, issue short-lived credentials acting as NAME instead (what an enclave should
    be given): IAM's {"credential": {access, secret, securitytoken, expires_at}}."""
    client, url = _connection(credentials_path, endpoint)
    if temporary:
        if is_admin:
            raise InputError("--admin and --temporary exclude each other (temporary credentials act as NAME)")
        seconds = _seconds(duration, "--duration")
        reply = _call(client, "admin/create-temporary-credentials", {"name": name, "duration_seconds": seconds})
        credential = reply["credential"]
        if output_path:
            _write_temporary(Path(output_path), url, credential, client.credentials.project_id)
            say(f"credentials written to {output_path}")
        emit_json(reply)
        return
    reply = _call(client, "admin/create-principal", {"name": name, "admin": is_admin})
    if output_path:
        credentials = Credentials(reply["access_key"], reply["secret_key"],
                                  client.credentials.project_id)
        write_credentials(Path(output_path), url, credentials)
        say(f"credentials written to {output_path}")
    emit_json(reply)


def _seconds(text: str, option: str) -> int:
    try:
        return max(1, round(parse_duration(text)))
    except InputError:
        raise InputError(f"{option}: not a duration: {text!r} (e.g. 900, 15m, 2h)") from None


def _write_temporary(path: Path, endpoint: str, credential: dict, project_id: str) -> None:
    """A credentials file with the security token and expiry besides the usual fields."""
    credentials = Credentials(credential["access"], credential["secret"], project_id,
                              security_token=credential["securitytoken"])
    write_credentials(path, endpoint, credentials, expires_at=credential["expires_at"])


@command.group("token")
def token() -> None:
    """IAM-style tokens (X-Auth-Token) acting as a principal."""


@token.command("create")
@click.argument("name")
@click.option("--duration", default="24h", show_default=True, metavar="DURATION",
              help="How long the token stays valid (1m .. 24h).")
@_admin_options
def token_create(name, duration, credentials_path, endpoint) -> None:
    """Issue a token acting as the principal NAME; prints {"token", "expires_at"}."""
    seconds = _seconds(duration, "--duration")
    emit_json(_call(_client(credentials_path, endpoint), "admin/create-token",
                    {"name": name, "duration_seconds": seconds}))


@command.group("policy")
def policy() -> None:
    """IAM-like policies attached to principals."""


def _target(name: str | None, access_key: str | None) -> dict:
    if (name is None) == (access_key is None):
        raise InputError("give --name or --access-key")
    return {"name": name} if name else {"access_key": access_key}


POLICY_HELP = """Attach a policy to a principal (--name/--principal or --access-key), replacing any
previous one: the JSON document in POLICY_FILE, or one generated from --allow.

\b
Document: {"Version": "1.1", "Statement": [{"Effect": "Allow"|"Deny",
  "Action": ["kms:cmk:decrypt", ...], "Resource": ["KMS:*:*:KeyId:<key id>"],
  "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation/PCR0": "<hex>"}}}]}
Actions: decrypt-data kms:cmk:decrypt, encrypt-data kms:cmk:encrypt, create-datakey
  kms:dek:create, decrypt-datakey kms:dek:decrypt, gen-random kms:cmk:generate, ...
Condition keys: kms:RecipientAttestation/PCR<n> (lower-case hex of a verified document);
  operators StringEquals, StringEqualsIgnoreCase, StringLike, Null, Bool.
Default deny; a matching Allow grants; a matching Deny wins.  Full reference:
docs/kms-policies.md.  Try a document with `qtbuild kms policy check`.

\b
Generated (the common case):
  qtbuild kms policy put --principal app --allow decrypt-data --key KEY \\
      --pcr0-from measurements.json [--pcr8 HEX]
"""


@policy.command("put", help=POLICY_HELP)
@click.argument("policy_file", required=False,
                type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--name", "--principal", "name", help="The principal's name.")
@click.option("--access-key", help="The principal's access key.")
@click.option("--allow", "apis", multiple=True, metavar="API",
              help="Generate a policy allowing this API (e.g. decrypt-data); repeatable.")
@click.option("--key", "key_id", metavar="KEY_ID", help="With --allow: the key the policy covers.")
@click.option("--pcr0", "pcr0", multiple=True, metavar="HEX", help="With --allow: an accepted PCR0; repeatable.")
@click.option("--pcr0-from", "measurements", type=click.Path(exists=True, dir_okay=False),
              help="With --allow: take PCR0 from the measurements JSON `convert` printed.")
@click.option("--pcr8", "pcr8", multiple=True, metavar="HEX",
              help="With --allow: also require this PCR8 (signing certificate); repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the document instead of attaching it.")
@_admin_options
def policy_put(policy_file, name, access_key, apis, key_id, pcr0, measurements, pcr8, dry_run,
               credentials_path, endpoint) -> None:
    if apis:
        if policy_file:
            raise InputError("give POLICY_FILE or --allow, not both")
        document = _generated_policy(apis, key_id, pcr0, measurements, pcr8)
    elif policy_file:
        if key_id or pcr0 or measurements or pcr8:
            raise InputError("--key, --pcr0, --pcr0-from and --pcr8 go with --allow")
        document = _read_policy(policy_file)
    else:
        raise InputError("give POLICY_FILE, or --allow API --key KEY --pcr0-from FILE")
    if dry_run:
        emit_json(document)
        return
    body = {**_target(name, access_key), "policy": document}
    emit_json(_call(_client(credentials_path, endpoint), "admin/put-policy", body))


def _generated_policy(apis, key_id, pcr0, measurements, pcr8) -> dict:
    from qtbuild.runtime.kms.policy import PolicyError
    from qtbuild.runtime.kms.policy_author import allow_policy

    if not key_id:
        raise InputError("--allow needs --key KEY_ID")
    values = [pcr_hex(value, "--pcr0") for value in pcr0]
    if measurements:
        values.append(_measured_pcr0(measurements))
    if not values:
        raise InputError("--allow needs --pcr0 HEX or --pcr0-from measurements.json (an enclave's "
                         "identity; a policy without one lets any enclave decrypt)")
    try:
        return allow_policy(list(apis), key_id, values, [pcr_hex(value, "--pcr8") for value in pcr8])
    except (ValueError, PolicyError) as exc:
        raise InputError(f"--allow: {exc}") from None


def _measured_pcr0(path: str) -> str:
    return measured_pcrs(path)[0].hex()


def _read_policy(path: str) -> dict:
    data = read_bounded(path, MAX_POLICY_FILE, "not a policy document")
    return load_json_object(data, what=path, error=InputError)


@policy.command("get")
@click.option("--name", help="The principal's name.")
@click.option("--access-key", help="The principal's access key.")
@_admin_options
def policy_get(name, access_key, credentials_path, endpoint) -> None:
    """Print a principal's policy (null when it has none)."""
    reply = _call(_client(credentials_path, endpoint), "admin/get-policy",
                  _target(name, access_key))
    emit_json(reply)


@policy.command("check")
@click.option("--name", "--principal", "name", help="The principal's name.")
@click.option("--access-key", help="The principal's access key.")
@click.option("--key", "key_id", required=True, metavar="KEY_ID", help="The key the request is on.")
@click.option("--action", "action", default="decrypt-data", show_default=True, metavar="API|ACTION",
              help="An API (decrypt-data) or an action name (kms:cmk:decrypt).")
@click.option("--document", "document_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="The recipient's attestation document (raw COSE or base64); omit for a request "
                   "without one.")
@click.option("--attestation-root", "root_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Trust this root (PEM) as well as the local PKI's; repeatable.")
@click.option("--allow-debug", is_flag=True, help="Accept a debug-mode document (as `serve --allow-debug`).")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@_admin_options
def policy_check(name, access_key, key_id, action, document_path, root_paths, allow_debug, as_json,
                 credentials_path, endpoint) -> None:
    """Explain whether the principal's policy allows ACTION on KEY for the recipient whose
    attestation document is DOCUMENT: the statement that matched or the condition that failed.

    The document is verified as the KMS would (chain to a trusted root, signature, debug mode,
    RSA key) except for its age.  Exit 0 allowed, 1 denied or document refused, 2 usage error.
    """
    from qtbuild.runtime.kms.policy import PolicyError, parse_policy
    from qtbuild.runtime.kms.policy_author import actions_for, explain

    try:
        actions = actions_for(action)
    except ValueError as exc:
        raise InputError(f"--action: {exc}") from None
    client, _ = _connection(credentials_path, endpoint)
    with client:
        stored = client.call("admin/get-policy", _target(name, access_key))
        realm = client.call("describe-key", {"key_id": key_id})["key_info"]["realm"]
    resource = f"kms:{realm}:{client.credentials.project_id}:KeyId:{key_id}"
    context, refusal = _recipient_context(document_path, root_paths, allow_debug)
    try:
        policy = None if stored["policy"] is None else parse_policy(stored["policy"])
    except PolicyError as exc:
        raise InputError(f"the stored policy is invalid: {exc}") from None
    explanation = explain(policy, actions, resource, context)
    allowed = explanation.decision.allowed and refusal is None
    if as_json:
        emit_json({"allowed": allowed, "reason": refusal or explanation.decision.reason,
                   "document_refused": refusal, "actions": list(actions), "resource": resource,
                   "context": context,
                   "statements": [vars(report) for report in explanation.statements]})
    else:
        _print_explanation(explanation, allowed, refusal, actions, resource, context, policy)
    if not allowed:
        raise click.exceptions.Exit(1)


def _recipient_context(document_path, root_paths, allow_debug) -> tuple[dict, str | None]:
    """(policy condition keys, None) for a verified document; ({}, why) when the KMS would refuse it."""
    from qtbuild.runtime.kms.errors import KmsError

    if document_path is None:
        return {}, None
    data = read_bounded(document_path, 64 * 1024, "not an attestation document")
    stripped = data.strip()
    try:
        text = base64.b64encode(base64.b64decode(stripped, validate=True)).decode() if stripped else ""
    except ValueError:
        text = base64.b64encode(data).decode()
    if not stripped or not text:
        raise InputError(f"{document_path}: empty: expected an attestation document")
    verifier = recipient_verifier(root_paths, max_age=f"{_AGE_NOT_CHECKED}s", allow_debug=allow_debug)
    try:
        recipient = verifier.verify({"attestation_document": text})
    except KmsError as error:
        return {}, f"the KMS refuses the document: {error.code} {error.message}"
    return dict(recipient.conditions()), None


_AGE_NOT_CHECKED = 100 * 365 * 86400


def _print_explanation(explanation, allowed, refusal, actions, resource, context, policy) -> None:
    """Text: the verdict, the request, the document's PCR0/PCR8 and whatever keys the policy
    names (``--json`` has them all), then one line per statement."""
    click.echo(f"{'ALLOWED' if allowed else 'DENIED'}: {refusal or explanation.decision.reason}")
    click.echo(f"  request: {' or '.join(actions)} on {resource}")
    named = {condition.key for statement in (policy.statements if policy else ())
             for condition in statement.conditions}
    shown = {key: value for key, value in context.items()
             if key.lower() in named or key in ("kms:RecipientAttestation/PCR0", "kms:RecipientAttestation/PCR8")}
    for key, value in shown.items():
        click.echo(f"  document: {key} = {value}")
    if not context:
        click.echo("  document: none (no kms:RecipientAttestation/* keys)")
    for report in explanation.statements:
        click.echo(f"  Statement[{report.index}] {report.effect}: {report.outcome}: {report.detail}")


@command.command("audit")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", "marker", type=click.IntRange(min=0), default=0,
              help="Only records with a larger id.")
@click.option("--principal", help="Only this principal's requests.")
@click.option("--key-id", help="Only requests on this key.")
@click.option("--decision", type=click.Choice(["allow", "deny", "error"]))
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_admin_options
def audit(limit, marker, principal, key_id, decision, as_json, credentials_path, endpoint
          ) -> None:
    """Show the audit log: time, principal, API, key, decision and reason, PCR0/PCR8."""
    body = {"limit": limit, "marker": marker}
    for name, value in (("principal", principal), ("key_id", key_id), ("decision", decision)):
        if value is not None:
            body[name] = value
    reply = _call(_client(credentials_path, endpoint), "admin/list-audit", body)
    if as_json:
        emit_json(reply)
        return
    for record in reply["records"]:
        click.echo(_audit_line(record))


def _audit_line(record: dict) -> str:
    moment = datetime.fromtimestamp(record["time_ms"] / 1000, tz=UTC)
    pcrs = ""
    if record["pcr0"]:
        pcrs = f" pcr0={record['pcr0'][:16]}… pcr8={(record['pcr8'] or '-')[:16]}…"
    if record.get("encoding"):
        pcrs += f" ({record['encoding']} document)"
    return (f"{record['id']:>6} {moment.isoformat(timespec='milliseconds')[:23]}Z "
            f"{record['principal'] or '-':<12} {record['api'] or '-':<22} "
            f"{record['key_id'] or '-':<36} {record['decision']:<5} {record['status']} "
            f"{record['reason'] or ''}{pcrs}")
