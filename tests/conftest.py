"""Shared pytest configuration: the markers' behaviour and the hypothesis profiles.

Markers (registered in pyproject.toml; ``--strict-markers`` refuses any other):
``e2e`` is applied here to every test under tests/e2e (they need the Docker daemon and
docker-registry): deselect them with ``-m "not e2e"``; ``root`` marks tests that need root
(namespaces, mounts, cgroups, chown): they skip, saying so, when run as another user.

Hypothesis profiles are set here and nowhere else: ``ci`` (the default when ``CI`` is set, as
in .ci/run) runs the full budget, ``dev`` (the default otherwise) a quicker pass while iterating;
``HYPOTHESIS_PROFILE=ci`` or ``=dev`` chooses explicitly.  Tests only add settings specific to
them (a health check their fixtures trip, a smaller budget for an expensive example).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=300, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=60, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

_E2E = Path(__file__).parent / "e2e"


def pytest_configure(config: pytest.Config) -> None:
    """Give SIGINT its default meaning back when the runner inherited it ignored.

    A shell without job control starts a background command (``cmd &``) with SIGINT ignored, and
    an ignored signal stays ignored across exec: every CLI the tests start would then ignore the
    Ctrl-C that the interrupt tests send it (exit 0 instead of 130).  A handler, unlike an
    ignored disposition, is reset by exec, so the children start with SIGINT at its default.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_E2E):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("root") is not None and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (namespaces, mounts, cgroups): CI runs as root"))
