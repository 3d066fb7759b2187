"""The enclave commands' JSON shapes: qt's, and nitro-cli's (src/common/json_output.rs field
names and order), and the error codes of each tool."""

from __future__ import annotations

import re

from qtbuild.runtime.enclave import shapes
from qtbuild.runtime.enclave.errors import E_CID_IN_USE, E_MEMORY, EnclaveError
from qtbuild.runtime.enclave.state import RUNNING, STOPPED, EnclaveRecord

NITRO_RUN = ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"]


def record(**fields) -> EnclaveRecord:
    values = {"enclave_id": 1, "cid": 16, "cpus": 2, "memory_mib": 512, "debug": True, "eif_path": "/x.eif",
              "process_id": 77, "leaf_name": "enclave-1-abc", "name": "bank", "cpu_ids": [1, 3],
              "instance_id": "i-0761a4cbcc7632aef", "cloud": "nitro", "measurements": {"PCR0": "00"}}
    values.update(fields)
    return EnclaveRecord(**values)


def test_nitro_shapes():
    enclave = record()
    run = shapes.run_shape(enclave, "nitro")
    assert list(run) == NITRO_RUN
    assert re.fullmatch(r"i-0761a4cbcc7632aef-enc[0-9a-f]{16}", run["EnclaveID"])
    assert (run["EnclaveName"], run["CPUIDs"], run["ProcessID"]) == ("bank", [1, 3], 77)
    described = shapes.describe_shape(enclave, "nitro", RUNNING)
    assert list(described) == [*NITRO_RUN, "State", "Flags", "Measurements"]
    assert (described["State"], described["Flags"]) == ("RUNNING", "DEBUG_MODE")
    assert shapes.describe_shape(record(debug=False), "nitro", STOPPED)["Flags"] == "NONE"
    assert shapes.describe_shape(record(), "nitro", STOPPED)["State"] == "TERMINATED"
    assert shapes.terminate_shape(enclave, "nitro") == {"EnclaveName": "bank", "EnclaveID": run["EnclaveID"],
                                                        "Terminated": True}


def test_qingtian_shapes_are_qts():
    enclave = record(cloud="qingtian")
    assert list(shapes.run_shape(enclave, "qingtian")) == ["EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB",
                                                          "LaunchMode", "ProcessID", "Status"]
    assert shapes.terminate_shape(enclave, "qingtian") == {"EnclaveID": 1, "Terminated": True}
    assert shapes.describe_shape(enclave, "qingtian", RUNNING)["Cloud"] == "qingtian"


def test_error_codes_per_tool():
    memory = EnclaveError("memory too small", code=E_MEMORY)
    assert str(shapes.in_format(memory, "qingtian")) == "[E10] memory too small"
    assert str(shapes.in_format(memory, "nitro")) == "[E26] memory too small"
    assert str(shapes.in_format(EnclaveError("cid used", code=E_CID_IN_USE), "nitro")) == "[E29] cid used"
    assert str(shapes.in_format(EnclaveError("no code"), "nitro")) == "no code"
