"""Shared pytest configuration (markers and hypothesis profiles live in pyproject.toml and here)."""
