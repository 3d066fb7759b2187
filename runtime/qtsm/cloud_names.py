"""The cloud profiles' names, without the profiles: what ``qtbuild run``'s options and checks
need before the enclave starts.  :mod:`qtbuild.runtime.qtsm.clouds` (document encodings, x509)
costs more to import than the rest of the CLI's start-up, so the command imports it only when a
profile is used (a test checks that these names are the profiles')."""

from __future__ import annotations

__all__ = ["CLOUDS", "DEFAULT_CLOUD"]

DEFAULT_CLOUD = "qingtian"
CLOUDS = ("qingtian", "nitro")
