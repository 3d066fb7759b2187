"""The ``qtbuild`` command line: one module per command, each thin (parse, call, print, exit).

Exit codes everywhere: 0 success, 1 a check failed, 2 usage or input error, 130 interrupted
(:mod:`qtbuild.cli.errors`).  Errors are one clear line on stderr, ``qtbuild: error: <message>``,
never a traceback (:mod:`qtbuild.cli.command`, :mod:`qtbuild.cli.domain_errors`); machine output
(JSON) goes to stdout.  :mod:`qtbuild.cli.app` imports a command's module only when it runs.
"""

from __future__ import annotations

from qtbuild.cli.app import main

__all__ = ["main"]
