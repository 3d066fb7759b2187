"""``qtbuild run``'s start-up path: what each of its three interpreters (CLI, enclave supervisor,
sandbox helper) imports before the application runs, the names the CLI uses instead of the cloud
profiles, the lazy package interfaces, and work overlapped with the loader child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from qtbuild.runtime import sdk
from qtbuild.runtime.enclave.charged import load_charged
from qtbuild.runtime.qtsm.cloud_names import CLOUDS, DEFAULT_CLOUD
from qtbuild.runtime.qtsm.clouds import PROFILES

#: Expensive to import and needed only once the enclave runs (or not at all) by each interpreter.
HEAVY = ("cryptography", "asyncio", "http.client", "qtbuild.runtime.qtsm.clouds", "qtbuild.runtime.qtsm.pki")


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(completed.stdout))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in modules]


def test_the_supervisor_imports_only_what_loading_the_image_needs():
    modules = modules_after("import qtbuild.runtime.enclave.supervisor")
    assert loaded(modules, (*HEAVY, "click", "qtbuild.runtime.enclave.manager", "qtbuild.runtime.sandbox.probe",
                            "qtbuild.formats.eif_signature")) == []


def test_the_sandbox_helper_does_not_import_the_host_side():
    modules = modules_after("import qtbuild.runtime.sandbox.helper")
    assert loaded(modules, (*HEAVY, "qtbuild.runtime.sandbox.host", "qtbuild.runtime.sandbox.probe")) == []


def test_the_run_command_imports_no_cloud_profile_before_starting():
    assert loaded(modules_after("import qtbuild.cli.enclave"), HEAVY) == []


def test_the_clis_cloud_names_are_the_profiles():
    assert tuple(PROFILES) == CLOUDS
    assert DEFAULT_CLOUD in PROFILES


def test_the_sdk_resolves_every_public_name_and_its_modules_on_use():
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    assert sdk.vsock.PARENT_CID == 3 and sdk.qtsm.Qtsm is sdk.Qtsm  # modules stay attributes, as before
    assert set(sdk.__all__) <= set(dir(sdk))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sdk.nothing  # noqa: B018


def test_meanwhile_runs_while_the_child_loads(tmp_path):
    flag = tmp_path / "meanwhile-ran"

    def load() -> str:
        deadline = time.monotonic() + 20
        while not flag.exists():  # only the parent's meanwhile creates it
            if time.monotonic() > deadline:
                return "meanwhile did not run during the load"
            time.sleep(0.01)
        return "loaded"

    assert load_charged(None, load, meanwhile=flag.touch) == "loaded"


def test_a_failing_meanwhile_kills_the_loader_and_propagates():
    def load() -> str:
        time.sleep(60)
        return "loaded"

    def meanwhile() -> None:
        raise OSError("no PKI")

    children_before = _children()
    started = time.monotonic()
    with pytest.raises(OSError, match="no PKI"):
        load_charged(None, load, meanwhile=meanwhile)
    assert time.monotonic() - started < 10
    assert _children() == children_before  # killed and reaped


def _children() -> set[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as handle:
        return {int(pid) for pid in handle.read().split()}
