"""The samples end to end, ``qtbuild demo hello|bank-card``: sample code, not part of qtbuild.

``qtbuild demo`` imports this package from the samples directory and calls :func:`missing`
before anything starts, then ``DEMOS[name](keep=...)``; a failed step raises :class:`DemoError`.
"""

from .demo import DEMOS, DemoError
from .preflight import missing

__all__ = ["DEMOS", "DemoError", "missing"]
