"""A package's public names imported on first use (PEP 562 module ``__getattr__``).

For packages whose submodules run as their own processes (``python -m`` the enclave supervisor,
the sandbox helper): Python imports the package first, and an ``__init__`` that imported every
submodule would make each of those processes pay for what only other callers need.  A package
lists ``{name: submodule}`` and binds what :func:`lazy_exports` returns::

    _resolve, __dir__ = lazy_exports(__name__, {"Manager": "manager", ...})

    def __getattr__(name: str) -> object:  # a def, so type checkers still see the submodules
        return _resolve(name)

(The enclave SDK keeps its own copy of this: it must import nothing outside itself.)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(resolve, __dir__)`` for ``package``: ``resolve(name)`` imports a name in ``exports``
    from its submodule (then keeps it in the package); any other name is an AttributeError."""
    namespace = sys.modules[package].__dict__

    def resolve(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return resolve, __dir__
