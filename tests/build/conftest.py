"""Fixtures for the qtbuild/ side's tests."""

from helpers.registry_server import registry  # noqa: F401 -- the session fixture test_registry.py requests
