"""Fixtures for end-to-end flows that need the Docker daemon and a registry.

Without a daemon (or docker-registry) these tests skip, except under CI (CI=true), where
.ci/run starts dockerd and installs the registry: there a missing service fails the test.
"""

from __future__ import annotations

import os

import pytest

from helpers.registry_server import registry  # noqa: F401 -- re-exported fixture


@pytest.fixture(scope="session")
def docker_client():
    """A reachable Docker daemon client."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # docker raises DockerException, requests errors, ...
        message = f"no Docker daemon answers ({exc}); start it with scripts/start-dockerd.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield client
    client.close()
