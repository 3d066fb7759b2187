"""``convert`` warns (never fails) when an image's config or well-known files look like
credentials, without echoing the values."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qtbuild.cli.app import cli
from qtbuild.convert.credential_scan import credential_warnings

from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
PRIVATE_KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
CERTIFICATE = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def scan(config_inner: dict, files: dict[str, bytes] | None = None) -> list[str]:
    files = files or {}
    return credential_warnings({"config": config_inner}, list(files), files.get)


def test_env_labels_and_arguments_that_look_like_credentials():
    warnings = scan({
        "Env": ["PATH=/usr/bin", f"HUAWEICLOUD_SDK_SK={SECRET}", "DB_PASSWORD=hunter2", f"KEYID={AWS_ID}",
                "API_TOKEN=", "LANG=C.UTF-8"],
        "Labels": {"maintainer": "me", "deploy.secret": "s3cr3t"},
        "Cmd": ["python3", "app.py", f"--secret-key={SECRET}", "--verbose"]})
    places = [warning.split(":")[0] for warning in warnings]
    assert places == ["image config Env HUAWEICLOUD_SDK_SK", "image config Env DB_PASSWORD",
                      "image config Env KEYID", "image config label deploy.secret", "image config Cmd[2]"]
    joined = "\n".join(warnings)
    assert SECRET not in joined and "hunter2" not in joined and AWS_ID not in joined
    assert "never bake secrets into an image" in warnings[0]


def test_well_known_files_and_private_keys_but_not_certificates():
    warnings = scan({}, {
        "root/.aws/credentials": b"[default]\naws_access_key_id=x\n",
        "app/tls.key": PRIVATE_KEY, "app/tls.pem": CERTIFICATE, "app/signing.pem": PRIVATE_KEY,
        "root/.ssh/id_ed25519": b"whatever", "app/main.py": PRIVATE_KEY})
    assert [warning.split(":")[0] for warning in warnings] == [
        "file /root/.aws/credentials", "file /app/tls.key", "file /app/signing.pem", "file /root/.ssh/id_ed25519"]


def test_clean_image_gives_no_warning():
    assert scan({"Env": ["PATH=/usr/bin", "PYTHONPATH=/app"], "Cmd": ["python3", "/app/app.py"]},
                {"app/app.py": b"print('hi')"}) == []


def test_convert_warns_on_stderr_and_still_builds(tmp_path):
    layer = make_tar([file("app/app.py", b"print(1)\n"), file("app/key.pem", PRIVATE_KEY)])
    config = default_config(cmd=["/app/app.py"], env=["PATH=/usr/bin", f"HUAWEICLOUD_SDK_SK={SECRET}"])
    write_oci_layout(tmp_path / "image", [layer], config, tag="v1")
    result = CliRunner().invoke(cli, ["convert", f"oci:{tmp_path / 'image'}:v1", "-o", str(tmp_path / "app.eif")],
                                env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert result.exit_code == 0, result.output
    assert "PCR0" in json.loads(result.stdout) and (tmp_path / "app.eif").stat().st_size > 0
    assert "warning: image config Env HUAWEICLOUD_SDK_SK" in result.stderr
    assert "warning: file /app/key.pem: holds a private key" in result.stderr
    assert SECRET not in result.stderr
