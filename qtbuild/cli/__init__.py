"""The ``qtbuild`` command line: one module per command, each thin (parse, call, print, exit).

Exit codes everywhere: 0 success, 1 a check failed, 2 usage or input error.  Errors are one
clear line on stderr, never a traceback; machine output (JSON) goes to stdout.
"""

from __future__ import annotations

from qtbuild.cli.app import main

__all__ = ["main"]
