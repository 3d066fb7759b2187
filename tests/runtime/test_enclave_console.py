"""The debug console: ring buffer semantics and the one-reader socket."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import pytest

from qtbuild.runtime.enclave.console import (
    HANGUP_POLL,
    ConsoleBusy,
    ConsoleServer,
    RingBuffer,
    pump,
    read_console,
)


def test_ring_keeps_the_last_capacity_bytes():
    ring = RingBuffer(capacity=10)
    ring.append(b"abcdef")
    ring.append(b"ghijkl")
    assert ring.start == 2
    ring.close()
    assert b"".join(ring.follow()) == b"cdefghijkl"
    assert b"".join(ring.follow(8)) == b"ijkl"
    assert b"".join(ring.follow(0)) == b"cdefghijkl"  # overwritten bytes are skipped


def test_a_single_append_larger_than_the_ring():
    ring = RingBuffer(capacity=4)
    ring.append(b"0123456789")
    ring.close()
    assert b"".join(ring.follow(0)) == b"6789"


def test_followers_wait_for_more_and_end_when_closed():
    ring = RingBuffer()
    received: list[bytes] = []
    follower = threading.Thread(target=lambda: received.extend(ring.follow()))
    follower.start()
    for piece in (b"one ", b"two ", b"three"):
        ring.append(piece)
        time.sleep(0.01)
    ring.close()
    follower.join(5)
    assert b"".join(received) == b"one two three"


def test_read_times_out_with_empty_data():
    ring = RingBuffer()
    assert ring.read(0, timeout=0.01) == (0, b"")
    ring.close()
    assert ring.read(0) is None


def test_pump_copies_a_pipe_until_eof():
    ring = RingBuffer()
    read_end, write_end = os.pipe()
    thread = threading.Thread(target=pump, args=(read_end, ring))
    thread.start()
    os.write(write_end, b"hello\n")
    os.close(write_end)
    thread.join(5)
    assert b"".join(ring.follow()) == b"hello\n"


@pytest.fixture
def served(tmp_path):
    ring = RingBuffer()
    server = ConsoleServer(ring, tmp_path / "console.sock")
    yield ring, server
    ring.close()
    server.close()


def test_reader_gets_the_backlog_then_live_output_until_the_end(served):
    ring, server = served
    ring.append(b"boot\n")
    output = io.BytesIO()
    reader = threading.Thread(target=read_console, args=(server.path, output))
    reader.start()
    time.sleep(0.05)
    ring.append(b"later\n")
    ring.close()
    reader.join(5)
    assert output.getvalue() == b"boot\nlater\n"
    assert oct(os.stat(server.path).st_mode & 0o777) == "0o600"


def test_one_reader_at_a_time_and_a_reader_that_leaves_frees_it(served):
    ring, server = served
    first = socket.socket(socket.AF_UNIX)
    first.connect(str(server.path))
    assert first.recv(3) == b"OK\n"
    with pytest.raises(ConsoleBusy):
        read_console(server.path, io.BytesIO())
    first.close()  # no output to fail on: the server notices the hang-up by itself
    time.sleep(HANGUP_POLL * 2)
    output = io.BytesIO()
    reader = threading.Thread(target=read_console, args=(server.path, output))
    reader.start()
    time.sleep(0.05)
    ring.append(b"for the second reader\n")
    ring.close()
    reader.join(5)
    assert output.getvalue() == b"for the second reader\n"


def test_no_server_is_a_connection_error(tmp_path):
    with pytest.raises(ConnectionError):
        read_console(tmp_path / "missing.sock", io.BytesIO())


def test_close_removes_the_socket(tmp_path):
    server = ConsoleServer(RingBuffer(), tmp_path / "c.sock")
    server.close()
    server.close()
    assert not (tmp_path / "c.sock").exists()



class _ClosedPipe(io.RawIOBase):
    """An output whose reader went away (`qtbuild enclave console | head -1`)."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_closing_our_output_ends_quietly_and_frees_the_console(served):
    """Bug: BrokenPipeError is a ConnectionError, so `console | head` reported 'not running'."""
    ring, server = served
    ring.append(b"hello enclave!\n")
    read_console(server.path, _ClosedPipe())  # returns, raises nothing
    time.sleep(HANGUP_POLL * 2)  # the server notices the hang-up by itself
    output = io.BytesIO()
    reader = threading.Thread(target=read_console, args=(server.path, output))
    reader.start()
    time.sleep(0.05)
    ring.append(b"still running\n")
    ring.close()
    reader.join(5)
    assert output.getvalue().endswith(b"still running\n")
