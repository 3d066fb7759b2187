"""``qtbuild handoff CID --job JOB.json``: give an enclave its job and short-lived KMS credentials
once it has attested, and print the result it sends back (protocol and enclave side:
``qtbuild.runtime.sdk.handoff``; docs/sdk.md, "The hand-off").

Exit codes: 0 the enclave answered (its result on stdout), 1 its attestation document was
refused (the failed check on stderr; the enclave is told why), 2 usage or input error.
"""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import CheckFailed, InputError
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json, say
from qtbuild.cli.parent_vsock import parent_vsock_config
from qtbuild.formats.bounded_input import load_json_object
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.handoff import DEFAULT_PORT, HandoffError

MAX_JOB_FILE = 40 * 1024


@click.command("handoff", cls=QtbuildCommand)
@click.argument("cid", type=click.IntRange(4, vsock.VMADDR_CID_ANY - 1))
@click.option("--job", "job_path", required=True, type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="The job: a JSON object (inputs, ciphertexts, presigned URLs …; ≤ 40 KiB).")
@click.option("--kms-credentials", "credentials_path", type=click.Path(exists=True, dir_okay=False),
              help="A principal's credentials file to put in the job as \"credentials\": short-lived ones "
                   "(`kms principal create NAME --temporary --duration 15m --out FILE`; long-lived ones get a "
                   "warning), of a principal whose policy pins the enclave, never the admin.")
@click.option("--port", type=click.IntRange(0, vsock.VMADDR_PORT_ANY - 1), default=DEFAULT_PORT,
              show_default=True, help="The vsock port the enclave's receive_job listens on.")
@click.option("--pcr0", "pcr0", metavar="HEX", help="Accept only an enclave with this PCR0.")
@click.option("--pcr0-from", "measurements", type=click.Path(exists=True, dir_okay=False),
              help="Accept only the PCR0 (and PCR8, if signed) of these measurements (`convert`'s output).")
@click.option("--attestation-root", "root_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also trust this attestation root (PEM); the local PKI's root is trusted by default.")
@click.option("--trust-hardware-roots", is_flag=True, help="Also trust the AWS Nitro and Huawei QingTian roots.")
@click.option("--allow-debug", is_flag=True, help="Accept a debug-mode enclave (all-zero PCRs).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the enclave to listen, and for each message.")
@click.option("--result-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the enclave's result [--timeout].")
@click.option("--save-document", "document_path", type=click.Path(dir_okay=False),
              help="Write the enclave's attestation document here (for `qtbuild kms policy check --document`).")
@click.option("--transport", type=click.Choice(vsock.TRANSPORTS),
              help=f"vsock transport (default: ${vsock.ENV_TRANSPORT} or auto).")
@click.option("--vsock-dir", type=click.Path(file_okay=False),
              help=f"Emulated vsock socket root (default: ${vsock.ENV_DIR}, else the local runtime's).")
def command(cid, job_path, credentials_path, port, pcr0, measurements, root_paths, trust_hardware_roots,
            allow_debug, timeout, result_timeout, document_path, transport, vsock_dir) -> None:
    """Hand enclave CID its job and short-lived credentials after it attests; print its result.

    The enclave calls receive_job(PORT) (qtbuild SDK).  Its attestation document must chain to a
    trusted root, carry this command's fresh nonce, and match --pcr0/--pcr0-from; only then is
    the job sealed to the key in the document and sent.  Nothing secret is ever in the image.
    """
    from qtbuild.runtime.handoff import HandoffRefused, hand_off

    job = _job(job_path, credentials_path)
    trust = _trust(pcr0, measurements, root_paths, trust_hardware_roots, allow_debug)
    config = parent_vsock_config(transport, vsock_dir)
    try:
        outcome = hand_off(cid, job, trust, port=port, timeout=timeout, result_timeout=result_timeout,
                           config=config)
    except HandoffRefused as refused:
        raise CheckFailed(f"enclave {cid}: {refused}") from None
    except HandoffError as error:
        raise CheckFailed(f"enclave {cid}: hand-off failed: {error}") from None
    if document_path:
        write_atomically(document_path, outcome.document_bytes, 0o644)
    say(f"qtbuild handoff: enclave {cid} attested (PCR0 {outcome.document.pcrs[0].hex()[:16]}…) and answered")
    if credentials_path and _long_lived(job):
        say(f"qtbuild handoff: warning: {credentials_path} held long-lived credentials; hand an enclave short-lived "
            "ones (qtbuild kms principal create NAME --temporary --duration 15m --out FILE)")
    emit_json(outcome.result)


def _job(path: str, credentials_path: str | None) -> dict:
    data = read_bounded(path, MAX_JOB_FILE, f"a job is at most {MAX_JOB_FILE} bytes of JSON")
    job = load_json_object(data, what=f"{path}: the job", error=InputError)
    if credentials_path:
        from qtbuild.runtime.kms.state import read_credentials

        try:
            _endpoint, credentials = read_credentials(credentials_path)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        job["credentials"] = {"access_key": credentials.access_key, "secret_key": credentials.secret_key,
                              "project_id": credentials.project_id}
        if credentials.security_token:
            job["credentials"]["security_token"] = credentials.security_token
    return job


def _long_lived(job: dict) -> bool:
    credentials = job.get("credentials")
    return isinstance(credentials, dict) and not credentials.get("security_token")


def _trust(pcr0, measurements, root_paths, hardware, allow_debug):
    from qtbuild.cli.attestation_options import measured_pcrs, pcr_hex, recipient_verifier
    from qtbuild.runtime.handoff import Trust

    verifier = recipient_verifier(root_paths, hardware=hardware, allow_debug=allow_debug)
    expected: dict[int, bytes] = {}
    if pcr0 and measurements:
        raise InputError("give --pcr0 or --pcr0-from, not both")
    if pcr0:
        expected[0] = bytes.fromhex(pcr_hex(pcr0, "--pcr0"))
    if measurements:
        expected.update(measured_pcrs(measurements))
    if not expected:
        say("qtbuild handoff: warning: no --pcr0/--pcr0-from: any enclave the roots vouch for gets the job")
    return Trust(roots=verifier.roots, root_fingerprints=verifier.root_fingerprints, expect_pcrs=expected,
                 allow_debug=allow_debug)
