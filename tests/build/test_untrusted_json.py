"""Untrusted JSON from registries and token servers goes through the one bounded loader."""

from __future__ import annotations

import pytest

from qtbuild.errors import ImageError
from qtbuild.sources.auth import _token_from


def test_a_deeply_nested_token_answer_is_an_image_error_not_a_recursion_error():
    """Regression: the token parser caught ValueError only, so 3000 nested arrays gave a traceback."""
    with pytest.raises(ImageError, match="did not answer a JSON object"):
        _token_from(b"[" * 3000 + b"]" * 3000, "https://auth.example/token")


def test_a_token_answer_is_read():
    assert _token_from(b'{"token": "abc"}', "https://auth.example/token") == "abc"
