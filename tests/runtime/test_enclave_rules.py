"""The local runtime's platform rules and their qt error codes."""

from __future__ import annotations

import pytest

from qtbuild.runtime.enclave.errors import EnclaveError
from qtbuild.runtime.enclave.rules import (
    ENV_MAX_ENCLAVES,
    MAX_CID,
    check_capacity,
    check_console,
    check_cpu_ids,
    check_resources,
    choose_cid,
    max_enclaves,
)

MIB = 1 << 20


def code_of(call, *args) -> int | None:
    with pytest.raises(EnclaveError) as caught:
        call(*args)
    assert str(caught.value).startswith(f"[E{caught.value.code:02d}] ") and "\n" not in str(caught.value)
    assert not caught.value.check_failed
    return caught.value.code


def test_memory_needs_128_mib_and_four_times_the_image():
    check_resources(2, 128, 32 * MIB, 2)
    assert code_of(check_resources, 2, 127, 1, 2) == 10
    assert code_of(check_resources, 2, 128, 32 * MIB + 1, 2) == 10
    check_resources(2, 512, 128 * MIB, 2)
    with pytest.raises(EnclaveError, match="at least 513 MiB"):
        check_resources(2, 512, 128 * MIB + 1, 2)


@pytest.mark.parametrize("cpus", [0, 1, 3, -2])
def test_cpu_count_must_be_even_and_positive(cpus):
    assert code_of(check_resources, cpus, 1024, 1, 8) == 2


def test_cpu_ids_must_be_distinct_and_available():
    check_cpu_ids((1, 3), {0, 1, 2, 3})
    assert code_of(check_cpu_ids, (1, 5), {0, 1, 2, 3}) == 2
    with pytest.raises(EnclaveError, match=r"CPU 5 is not available to this process \(available: 0,1,2,3\)"):
        check_cpu_ids((1, 5), {0, 1, 2, 3})
    with pytest.raises(EnclaveError, match="CPU 1 is given twice"):
        check_cpu_ids((1, 1), {0, 1})


def test_cpu_count_is_bounded_by_the_available_cpus():
    check_resources(4, 1024, 1, 4)
    with pytest.raises(EnclaveError, match="only 2 CPU"):
        check_resources(4, 1024, 1, 2)


def test_cid_defaults_to_the_first_free_from_4():
    assert choose_cid(None, {}) == 4
    assert choose_cid(None, {4: 0, 5: 1, 7: 2}) == 6


@pytest.mark.parametrize("cid", [0, 1, 2, 3, MAX_CID + 1])
def test_cid_range(cid):
    assert code_of(choose_cid, cid, {}) == 2


def test_cid_in_use_is_error_43():
    assert choose_cid(MAX_CID, {4: 0}) == MAX_CID
    with pytest.raises(EnclaveError, match=r"\[E43\] CID 4 is already used by enclave 0"):
        choose_cid(4, {4: 0})


def test_enclave_limit_defaults_to_two_and_is_overridable(monkeypatch):
    monkeypatch.delenv(ENV_MAX_ENCLAVES, raising=False)
    assert max_enclaves() == 2
    check_capacity([0], 2)
    with pytest.raises(EnclaveError, match="at most 2 enclaves"):
        check_capacity([0, 1], 2)
    monkeypatch.setenv(ENV_MAX_ENCLAVES, "5")
    assert max_enclaves() == 5
    for bad in ("0", "many", "-1"):
        monkeypatch.setenv(ENV_MAX_ENCLAVES, bad)
        assert code_of(max_enclaves) == 2


def test_console_only_in_debug_mode():
    check_console(0, True)
    assert code_of(check_console, 0, False) == 32


def test_cid_range_is_checked_before_any_state_is_created(tmp_path, monkeypatch):
    """`run --cid 2` used to create the local PKI before refusing the CID."""
    from qtbuild.runtime.enclave.manager import Manager, RunOptions

    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QTBUILD_RUNTIME_DIR", str(tmp_path / "run"))
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"x" * 1024)
    with pytest.raises(EnclaveError, match="must be in 4"):
        Manager().start(RunOptions(eif=str(eif), cid=3))
    assert not (tmp_path / "state").exists()
    with pytest.raises(EnclaveError, match=r"\[E02\] --instance-id: Huawei Cloud QingTian parent instance ids are"):
        Manager().start(RunOptions(eif=str(eif), instance_id="i-0123456789abcdef0"))
    with pytest.raises(EnclaveError, match="i- and 17 hex digits"):
        Manager().start(RunOptions(eif=str(eif), instance_id="6c9c1a4e-0d3b-4c59-9f83-6f0b5d1b2a77", cloud="nitro"))
    assert not (tmp_path / "state").exists()
