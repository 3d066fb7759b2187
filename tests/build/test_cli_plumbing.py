"""The command line's plumbing: the lazy command table, one error format, exit codes, Ctrl-C."""

from __future__ import annotations

import ast
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from qtbuild.cli import app
from qtbuild.cli.app import COMMANDS, cli
from qtbuild.cli.domain_errors import DOMAIN_ERRORS, as_cli_error
from qtbuild.cli.errors import EXIT_CHECK_FAILED, EXIT_INPUT_ERROR, EXIT_INTERRUPTED

from helpers.eif_inputs import write_inputs

CLI_DIR = Path(app.__file__).parent
ENTRY = "from qtbuild.cli import main; main()"


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True, timeout=60, **kwargs)


# -- the lazy command table ----------------------------------------------------------------------

#: Modules `qtbuild --help` must not pay for: x509, the KMS server, the enclave manager, the
#: Docker SDK, and every command's own module.
HEAVY = ("cryptography", "docker", "qtbuild.runtime", "qtbuild.convert", "qtbuild.sources",
         "qtbuild.inspect", "qtbuild.formats.eif")
COMMAND_MODULES = sorted({entry.module for entry in COMMANDS.values()})

IMPORTED_BY = """
import json, sys
from qtbuild.cli import main
sys.argv = ["qtbuild", *json.loads(sys.argv[1])]
try:
    main()
finally:
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def modules_imported_by(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", IMPORTED_BY, json.dumps(args)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.splitlines()[-1]))


def heavy(modules: set[str], allowed_command: str | None = None) -> list[str]:
    return sorted(name for name in modules
                  if name.startswith(HEAVY) or (name in COMMAND_MODULES and name != allowed_command))


def test_top_level_help_imports_no_command_and_nothing_heavy():
    modules = modules_imported_by("--help")
    assert heavy(modules) == []
    assert "click" in modules and "qtbuild.cli.app" in modules


def test_describe_help_imports_only_describe():
    modules = modules_imported_by("describe", "--help")
    assert "qtbuild.cli.describe" in modules
    assert heavy(modules, allowed_command="qtbuild.cli.describe") == []


def test_the_table_matches_the_commands_it_imports():
    for name, entry in COMMANDS.items():
        command = getattr(importlib.import_module(entry.module), entry.attribute)
        assert isinstance(command, click.Command) and command.name == name
        # the summary shown by `qtbuild --help` is the command's own short help, at any width
        for width in (30, 60, 1000):
            assert click.Command(name, help=entry.summary).get_short_help_str(width) == \
                command.get_short_help_str(width), name


def test_lazy_help_is_what_click_prints_for_the_imported_commands():
    eager = click.Group("qtbuild", help=cli.help, params=cli.params,
                        context_settings={"help_option_names": ["-h", "--help"]})
    for name, entry in COMMANDS.items():
        eager.add_command(getattr(importlib.import_module(entry.module), entry.attribute), name)
    for width in (80, 120):
        lazy_help = CliRunner().invoke(cli, ["--help"], prog_name="qtbuild", terminal_width=width)
        eager_help = CliRunner().invoke(eager, ["--help"], prog_name="qtbuild", terminal_width=width)
        assert lazy_help.exit_code == 0
        assert lazy_help.stdout == eager_help.stdout


def test_every_command_has_help():
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"], prog_name="qtbuild")
        assert result.exit_code == 0 and f"Usage: qtbuild {name}" in result.stdout, name


def _project_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_exit_codes_and_the_error_base_are_a_leaf_and_commands_do_not_import_the_app():
    assert sorted(_project_imports(CLI_DIR / "errors.py")) == ["__future__", "click", "sys"]
    importers = [path.name for path in CLI_DIR.glob("*.py") if "qtbuild.cli.app" in _project_imports(path)]
    assert importers == ["__init__.py"]  # no command module imports the group that lists it: no cycle


# -- one error format, exit codes mapped in one place --------------------------------------------

def test_every_domain_error_in_the_table_exists():
    for module_name, class_name, _convert in DOMAIN_ERRORS:
        error_class = getattr(importlib.import_module(module_name), class_name)
        assert issubclass(error_class, Exception), (module_name, class_name)


def test_domain_errors_become_exit_codes():
    from qtbuild.formats.errors import EifFormatError
    from qtbuild.runtime.enclave.errors import EnclaveError
    from qtbuild.runtime.sdk.kms_client import KmsClientError
    from qtbuild.runtime.verifier.attestation import AttestationError

    cases = [
        (EifFormatError("bad magic"), EXIT_INPUT_ERROR, "bad magic"),
        (EnclaveError("CID 4 is already used", code=43), EXIT_INPUT_ERROR, "[E43] CID 4 is already used"),
        (EnclaveError("CRC mismatch", check_failed=True), EXIT_CHECK_FAILED, "CRC mismatch"),
        (KmsClientError(403, "KMS.0306", "denied"), EXIT_CHECK_FAILED, "kms: 403 KMS.0306: denied"),
        (AttestationError("nonce", "differs"), EXIT_CHECK_FAILED, "invalid document: check 'nonce' failed: differs"),
        (AttestationError("input", "not CBOR"), EXIT_INPUT_ERROR, "unreadable document: not CBOR"),
        (FileNotFoundError(2, "No such file or directory", "x.eif"), EXIT_INPUT_ERROR,
         "No such file or directory: x.eif (check the path)"),
    ]
    for exc, code, message in cases:
        error = as_cli_error(exc)
        assert error is not None, exc
        assert (error.exit_code, error.format_message()) == (code, message)
    assert as_cli_error(ZeroDivisionError()) is None  # a bug keeps its traceback


@pytest.mark.parametrize("args, hint", [
    (["describe"], "see 'qtbuild describe --help'"),
    (["nosuch"], "see 'qtbuild --help'"),
    (["describe", "x.eif", "--format", "garbage"], "see 'qtbuild describe --help'"),
    (["kms", "create-key"], "see 'qtbuild kms create-key --help'"),
    (["proxy", "-l", "5000"], "see 'qtbuild proxy --help'"),
    (["enclave", "stop"], None),  # a command's own usage check
])
def test_usage_errors_are_one_line_with_a_hint(args, hint):
    done = run(*args)
    assert done.returncode == EXIT_INPUT_ERROR
    assert done.stderr.startswith("qtbuild: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Usage:" not in done.stderr and done.stdout == ""
    if hint:
        assert done.stderr.rstrip().endswith(hint)


def test_proxy_config_errors_are_one_line(tmp_path):
    """Regression: proxy reported config errors as click's three-line usage block."""
    config = tmp_path / "proxy.toml"
    config.write_text('[[routes]]\nvsock_port = 8000\n')
    done = run("proxy", "--config", str(config))
    assert done.returncode == EXIT_INPUT_ERROR
    assert done.stderr == f"qtbuild: error: {config}: routes[0]: missing key(s) host, port\n"


def test_a_check_failure_is_exit_1_in_the_same_format(tmp_path):
    files = write_inputs(tmp_path)
    built = run("build-eif", "--kernel", str(files / "kernel"), "--cmdline", "c", "--ramdisk", str(files / "boot.cpio"),
                "--ramdisk", str(files / "app.cpio"), "-o", str(tmp_path / "app.eif"), "-q")
    assert built.returncode == 0, built.stderr
    done = run("verify", str(tmp_path / "app.eif"), "--pcr0", "00" * 48)
    assert done.returncode == EXIT_CHECK_FAILED and "verification FAILED" in done.stdout
    done = run("pki", "show", "--state-dir", str(tmp_path / "nothing"))
    assert done.returncode == EXIT_INPUT_ERROR
    assert done.stderr == (f"qtbuild: error: no attestation PKI in {tmp_path / 'nothing' / 'pki'}: "
                           "run `qtbuild pki init`\n")


# -- Ctrl-C --------------------------------------------------------------------------------------

def test_an_interrupt_is_exit_130_not_click_aborted(monkeypatch, tmp_path):
    import qtbuild.formats.eif

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qtbuild.formats.eif.EifReader, "open", interrupted)
    (tmp_path / "x.eif").write_bytes(b"")
    result = CliRunner().invoke(cli, ["describe", str(tmp_path / "x.eif")])
    assert result.exit_code == EXIT_INTERRUPTED
    assert result.stderr == "qtbuild: interrupted\n" and result.stdout == ""


def test_sigint_while_writing_an_image_leaves_nothing_behind(tmp_path):
    """A real SIGINT in the middle of `build-eif`: exit 130, one line, no partial output file."""
    (tmp_path / "in").mkdir()
    files = write_inputs(tmp_path / "in")
    big = files / "big.cpio"
    with open(big, "wb") as handle:
        handle.truncate(256 << 20)  # sparse: cheap to create, takes a moment to hash and write
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-c", ENTRY, "build-eif", "--kernel", str(files / "kernel"),
                                "--cmdline", "c", "--ramdisk", str(files / "boot.cpio"), "--ramdisk", str(big),
                                "-o", str(out / "app.eif")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out):  # the temporary file beside the output: writing has begun
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "build-eif never started writing"
            time.sleep(0.002)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert stderr == "qtbuild: interrupted\n" and stdout == ""
    assert os.listdir(out) == []


# -- sdk export creates DIR, not its parents -----------------------------------------------------

def test_sdk_export_creates_only_the_directory_itself(tmp_path):
    done = run("sdk", "export", str(tmp_path / "missing" / "deeper" / "sdk"))
    assert done.returncode == EXIT_INPUT_ERROR and done.stdout == ""
    assert done.stderr == (f"qtbuild: error: {tmp_path / 'missing' / 'deeper' / 'sdk'}: its parent directory "
                           f"{tmp_path / 'missing' / 'deeper'} does not exist (only DIR itself is created; "
                           "create the parent first)\n")
    assert not (tmp_path / "missing").exists()
    done = run("sdk", "export", str(tmp_path / "sdk"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "sdk" / "qtbuild_sdk" / "__init__.py").is_file()


def test_a_failed_sdk_export_removes_the_directory_it_created(tmp_path, monkeypatch):
    import qtbuild.cli.sdk

    outside = tmp_path / "bad.py"
    outside.write_text("import qtbuild.convert\n")  # not self-contained: the export refuses it
    monkeypatch.setattr(qtbuild.cli.sdk, "sdk_sources", lambda: [outside])
    result = CliRunner().invoke(cli, ["sdk", "export", str(tmp_path / "new")])
    assert result.exit_code == EXIT_INPUT_ERROR and "outside the SDK" in result.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert CliRunner().invoke(cli, ["sdk", "export", str(tmp_path / "kept")]).exit_code == EXIT_INPUT_ERROR
    assert os.listdir(tmp_path / "kept") == []  # an existing directory stays, and stays empty
