"""The supervisor's entry point when its enclave directory has no record."""

from __future__ import annotations

import json
import os

from qtbuild.runtime.enclave import supervisor
from qtbuild.runtime.enclave.state import RuntimeDir


def test_a_missing_record_is_reported_not_raised(tmp_path):
    directory = RuntimeDir(tmp_path).enclave(0)
    directory.path.mkdir(parents=True)
    read_end, write_end = os.pipe()
    try:
        # Was AttributeError ('NoneType' object has no attribute 'process_id').
        assert supervisor.run(directory, supervisor.StatusPipe(write_end), None) == 1
        message = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "no enclave record" in message["error"] and message["check_failed"] is True
