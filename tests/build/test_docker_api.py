"""The daemon's inspect and save spoken with the standard library (qtbuild.sources.docker_api, through
qtbuild.sources.daemon_request): every failure is a one-line ImageError saying what to do; the save's
chunked body arrives regrouped and whole; the Docker SDK is never imported for a Unix socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from qtbuild.errors import ImageError
from qtbuild.sources import daemon_request, docker_api
from qtbuild.sources.base import Platform

from helpers.fake_docker import FakeDocker, answer, chunk, chunked_head, error

IMAGE_ID = "sha256:" + "1" * 64
INSPECT = json.dumps({"Id": IMAGE_ID, "RootFS": {"Type": "layers", "Layers": []}}).encode()


@pytest.fixture
def socket_path(tmp_path, monkeypatch):
    path = str(tmp_path / "docker.sock")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    for name in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
        monkeypatch.delenv(name, raising=False)
    return path


def daemon(path: str, save=None, *, inspect: bytes | None = None, api_version: str = "1.41") -> FakeDocker:
    """A daemon holding one image (``inspect``) whose save answers ``save(target)``."""
    def handler(target: str):
        if "/json" in target.partition("?")[0]:
            return inspect if inspect is not None else answer(200, INSPECT, api_version=api_version)
        return save(target)

    return FakeDocker(path, handler)


def saved(request: daemon_request.SaveRequest) -> bytes:
    return b"".join(request.chunks())


def test_a_missing_socket_says_how_to_reach_the_daemon(socket_path):
    request = daemon_request.SaveRequest("app:1")
    with pytest.raises(ImageError) as raised:
        request.inspected()
    assert str(raised.value) == (f"cannot reach the Docker daemon at unix://{socket_path}: No such file or directory; "
                                 "is dockerd running? set DOCKER_HOST to its socket")


def test_a_refused_connection_says_how_to_reach_the_daemon(socket_path):
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(socket_path)  # a socket file nobody listens on: what a stopped dockerd leaves
    with pytest.raises(ImageError, match="Connection refused; is dockerd running\\? set DOCKER_HOST to its socket$"):
        daemon_request.SaveRequest("app:1").inspected()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_socket_the_user_may_not_open_says_what_to_do(socket_path, tmp_path):
    os.chmod(tmp_path, 0o755)
    with daemon(socket_path):
        os.chmod(socket_path, 0o600)  # root's, as /var/run/docker.sock is (plus the docker group)
        code = ("import os\nfrom qtbuild.sources.daemon_request import SaveRequest\n"
                "os.setgid(65534)\nos.setuid(65534)\n"  # the interpreter is root's: drop to nobody once it runs
                "try:\n    SaveRequest('app:1').inspected()\nexcept Exception as exc:\n    print(exc)\n")
        result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout == (f"cannot reach the Docker daemon at unix://{socket_path}: permission denied; run as root, "
                             "add your user to the docker group, or set DOCKER_HOST to a socket you may use\n"), result


def test_an_image_the_daemon_lacks_is_named_with_the_fix(socket_path):
    missing = "^image 'app/x:1' not found in the Docker daemon; docker pull/build it first$"
    with daemon(socket_path, inspect=error(404, "No such image: app/x:1")), pytest.raises(ImageError, match=missing):
        daemon_request.SaveRequest("app/x:1").inspected()


def test_other_inspect_errors_carry_the_daemons_message_on_one_line(socket_path):
    with daemon(socket_path, inspect=error(500, "disk\nfailure")), \
            pytest.raises(ImageError, match="^Docker daemon error inspecting 'app:1': disk failure$"):
        daemon_request.SaveRequest("app:1").inspected()
    with daemon(socket_path + "2", inspect=b"SSH-2.0-OpenSSH\r\n"):
        os.environ["DOCKER_HOST"] = f"unix://{socket_path}2"
        with pytest.raises(ImageError, match="^cannot reach the Docker daemon at .*: not an HTTP answer; is dockerd"):
            daemon_request.SaveRequest("app:1").inspected()


def test_the_save_body_arrives_whole_regrouped_and_without_the_sdk(socket_path):
    pieces = [os.urandom(32768) for _ in range(70)] + [b"tail"]
    with daemon(socket_path, lambda target: [chunked_head(), *map(chunk, pieces), b"0\r\n\r\n"]) as fake:
        code = ("import sys\nfrom qtbuild.sources.daemon_request import SaveRequest\n"
                "sizes = [len(c) for c in SaveRequest('app:1').chunks()]\n"
                "print(sizes, 'docker' in sys.modules or 'requests' in sys.modules)\n")
        result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
        assert result.stdout == f"{[1 << 20, 1 << 20, 70 * 32768 + 4 - 2 * (1 << 20)]} False\n", result.stderr
        assert saved(daemon_request.SaveRequest("app:1")) == b"".join(pieces)
    assert fake.requests[:2] == ["/images/app:1/json", f"/images/{IMAGE_ID}/get"]  # by ID, no API version prefix


@pytest.mark.parametrize(("reply", "message"), [
    (error(500, "layer does not exist"), "layer does not exist"),
    ([chunked_head(), chunk(b"x" * 100)[:50]], "the answer ended inside a chunk"),
    ([chunked_head(), b"zz\r\n"], "malformed chunk size b'zz'"),
    ([chunked_head(), chunk(b"x" * 10)], "the daemon closed the connection in a chunk size"),
])
def test_a_save_failing_is_raised_where_the_chunks_are_read(socket_path, reply, message):
    with daemon(socket_path, lambda target: reply):
        chunks = daemon_request.SaveRequest("app:1").chunks()
        with pytest.raises(ImageError, match=f"^Docker daemon failed to save 'app:1': {message}$"):
            b"".join(chunks)


def test_a_save_request_closed_before_the_daemon_answers_drops_the_answer(socket_path):
    release = threading.Event()

    def exporting(target):
        assert release.wait(10)
        yield chunked_head()
        for _ in range(64):  # more than the socket buffers hold: the close is noticed
            yield chunk(bytes(65536))

    with daemon(socket_path, exporting) as fake:
        request = daemon_request.SaveRequest("app:1")
        request.close()
        release.set()
        assert fake.closed.wait(10)


@pytest.mark.parametrize(("api_version", "in_save"), [("1.41", False), ("1.48", True)])
def test_a_platform_goes_to_the_save_from_api_1_48(socket_path, api_version, in_save):
    with daemon(socket_path, lambda target: [chunked_head(api_version=api_version), b"0\r\n\r\n"],
                api_version=api_version) as fake:
        request = daemon_request.SaveRequest("app:1", Platform("linux", "arm64"))
        assert request.platform_in_save is in_save
        saved(request)
    query = '?platform=%7B%22os%22%3A+%22linux%22%2C+%22architecture%22%3A+%22arm64%22%7D'
    assert fake.requests[1] == f"/images/{IMAGE_ID}/get" + (query if in_save else "")


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, ("unix:///var/run/docker.sock", socket.AF_UNIX, "/var/run/docker.sock")),
    ({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}, (None, socket.AF_UNIX, "/run/user/1000/docker.sock")),
    ({"DOCKER_HOST": "tcp://127.0.0.1:2375"}, (None, socket.AF_INET, ("127.0.0.1", 2375))),
    ({"DOCKER_HOST": "tcp://[::1]"}, (None, socket.AF_INET6, ("::1", 2375))),
    ({"DOCKER_HOST": "tcp://10.0.0.1:2376", "DOCKER_TLS_VERIFY": "1"}, None),
    ({"DOCKER_HOST": "tcp://10.0.0.1:2376", "DOCKER_CERT_PATH": "/certs"}, None),
    ({"DOCKER_HOST": "ssh://me@host"}, None),
])
def test_only_what_a_plain_socket_reaches_skips_the_sdk(environ, expected):
    address = docker_api.socket_address(environ)
    if expected is None:
        assert address is None
    else:
        assert address is not None
        assert (expected[0] or address.url, address.family, address.target) == (address.url, *expected[1:])


def test_an_inspect_without_an_image_id_is_refused_before_any_save(socket_path):
    with daemon(socket_path, inspect=answer(200, json.dumps({"Id": "../../containers/x"}).encode())) as fake:
        request = daemon_request.SaveRequest("app:1")
        with pytest.raises(ImageError, match="^docker://app:1: image ID"):
            b"".join(request.chunks())
    assert fake.requests == ["/images/app:1/json"]
