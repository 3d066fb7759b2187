"""The enclave SDK is self-contained (it must not import qtbuild.formats), so it re-declares the
security module's limits and error variants; these tests keep the two declarations equal."""

from __future__ import annotations

import ast
from pathlib import Path

from qtbuild.formats import attestation
from qtbuild.runtime.sdk import qtsm as sdk_qtsm


def test_request_and_response_size_limits_match_the_format():
    assert sdk_qtsm.MAX_REQUEST_SIZE == attestation.MAX_REQUEST_SIZE
    assert sdk_qtsm.MAX_RESPONSE_SIZE == attestation.MAX_RESPONSE_SIZE


def test_error_variants_match_the_format():
    assert tuple(code.value for code in attestation.ErrorCode) == sdk_qtsm.ERROR_VARIANTS


def test_the_sdk_imports_nothing_from_qtbuild():
    """The pins above are only needed because of this rule; if it ever changes, import instead."""
    sdk = Path(sdk_qtsm.__file__).parent
    for module in sdk.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "qtbuild" for name in names), f"{module.name} imports {names}"
