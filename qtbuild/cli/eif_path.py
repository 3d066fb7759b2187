"""The image argument of describe/verify/sign: ``EIF`` or nitro-cli's ``--eif-path EIF``."""

from __future__ import annotations

import click


def eif_argument(function):
    """``EIF`` as an optional argument plus ``--eif-path`` (nitro-cli describe-eif/sign-eif)."""
    function = click.option("--eif-path", "eif_path", type=click.Path(dir_okay=False),
                            help="Alias of EIF (nitro-cli spelling).")(function)
    return click.argument("eif", required=False, type=click.Path(dir_okay=False))(function)


def chosen_eif(eif: str | None, eif_path: str | None) -> str:
    """The one image path given as EIF or --eif-path (a usage error for none or two different ones)."""
    if eif and eif_path and eif != eif_path:
        raise click.UsageError("give the image either as EIF or as --eif-path, not both")
    path = eif or eif_path
    if not path:
        raise click.UsageError("no image given: add the EIF path (or --eif-path EIF)")
    return path
