"""The options that say where a signing key's secrets come from, shared by convert, sign and build-eif."""

from __future__ import annotations

import click

#: ``--private-key``'s metavar: the three kinds of key it names.
KEY_METAVAR = "PEM|pkcs11:URI|kms://URI"

kms_credentials_option = click.option(
    "--kms-credentials", "kms_credentials", envvar="QTBUILD_KMS_CREDENTIALS",
    type=click.Path(exists=True, dir_okay=False),
    help="For a kms:// key: JSON file with the access_key/secret_key that sign KMS requests "
         "[$QTBUILD_KMS_CREDENTIALS; default: $KMS_ACCESS_KEY/$KMS_SECRET_KEY].")
