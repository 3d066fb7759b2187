"""The byte progress bars of convert and measure: tqdm on stderr when someone sees them, else nothing.

tqdm is imported only for a bar that is shown: its package import loads ``importlib.metadata``
(about 40 ms), which every ``measure`` and every ``convert`` in a pipeline (stderr not a terminal,
or ``--quiet``) would otherwise pay before its first layer byte.
"""

from __future__ import annotations

import sys
from typing import Protocol


class ProgressBar(Protocol):
    """What the pipeline uses of a tqdm bar."""

    disable: bool | None

    def update(self, n: float | None = 1) -> bool | None: ...

    def reset(self, total: float | None = None) -> None: ...

    def close(self) -> None: ...


class HiddenBar:
    """A bar nobody sees: every call does nothing."""

    disable: bool | None = True

    def update(self, n: float | None = 1) -> None:
        """Count nothing."""

    def reset(self, total: float | None = None) -> None:
        """Show nothing."""

    def close(self) -> None:
        """Nothing to clear."""


def progress_bar(what: str, quiet: bool) -> ProgressBar:
    """A byte progress bar named ``what`` on stderr; hidden when ``quiet`` or stderr is not a terminal.
    The caller closes it (``contextlib.closing``)."""
    if quiet or not sys.stderr.isatty():
        return HiddenBar()
    from tqdm import tqdm

    return tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
