"""Errors of the build side that the CLI reports as input errors (exit 2)."""


class ImageError(Exception):
    """A container image cannot be used: unreadable, malformed, hostile, or not found.

    The message names the problem and, where there is one, the fix.
    """
