"""The relay between two plain sockets moves bytes zero-copy (os.splice) and behaves exactly as
the copying relay: every byte in order, both directions, half-close passed on, bytes a stream had
already buffered first, and the copy taking over when the kernel refuses to splice."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import stat

import pytest

from qtbuild.runtime.sdk import relay, splice

pytestmark = pytest.mark.skipif(not splice.available(), reason="os.splice is Linux-only")


class SpliceSpy:
    """Counts os.splice calls, and the reads from a socket that found it empty (EAGAIN);
    optionally refuses them all with EINVAL (a socket without splice)."""

    def __init__(self, monkeypatch, refuse: bool = False) -> None:
        self.calls, self.real, self.refuse = 0, os.splice, refuse
        self.reads = self.empty_reads = 0
        monkeypatch.setattr(os, "splice", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        reading = not stat.S_ISFIFO(os.fstat(args[0]).st_mode)
        self.reads += reading
        try:
            return self.real(*args, **kwargs)
        except BlockingIOError:
            self.empty_reads += reading
            raise


async def _pair(family: int):
    """(our far end socket, the relay-side asyncio streams) for one connection of ``family``."""
    if family == socket.AF_INET:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
        far = socket.create_connection(server.sockets[0].getsockname()[:2])
        streams = await accepted
        server.close()
    else:
        far, near = socket.socketpair()
        streams = await asyncio.open_connection(sock=near)
    far.setblocking(False)
    return far, streams


async def _send_all_then_eof(far: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(far, data)
    far.shutdown(socket.SHUT_WR)


async def _receive_to_eof(far: socket.socket) -> bytes:
    loop, chunks = asyncio.get_running_loop(), []
    while chunk := await loop.sock_recv(far, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


async def _closed_after(outcome: asyncio.Task, *ends) -> str:
    """The relay's outcome, once it ends; then each (far socket, relay-side writer) closed."""
    result = await asyncio.wait_for(outcome, 10)
    for far, writer in ends:
        writer.close()
        far.close()
    return result


async def _exchange(a_family: int, b_family: int, a_to_b: bytes, b_to_a: bytes, early: bytes = b""):
    (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = await _pair(a_family), await _pair(b_family)
    if early:  # bytes the relay-side stream has already buffered when the relay starts
        await asyncio.get_running_loop().sock_sendall(a_far, early)
        while len(getattr(a_reader, "_buffer", b"")) < len(early):
            await asyncio.sleep(0.01)
    outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
    got_b, got_a, *_ = await asyncio.wait_for(asyncio.gather(
        _receive_to_eof(b_far), _receive_to_eof(a_far),
        _send_all_then_eof(a_far, a_to_b), _send_all_then_eof(b_far, b_to_a)), 60)
    result = await asyncio.wait_for(outcome, 10)
    for far, writer in ((a_far, a_writer), (b_far, b_writer)):
        writer.close()
        far.close()
    return got_b, got_a, result


PAIRS = [(socket.AF_UNIX, socket.AF_INET), (socket.AF_INET, socket.AF_UNIX), (socket.AF_INET, socket.AF_INET)]


@pytest.mark.parametrize("a_family, b_family", PAIRS, ids=["unix-tcp", "tcp-unix", "tcp-tcp"])
def test_large_transfers_both_ways_are_spliced_byte_exact(monkeypatch, a_family, b_family):
    spy = SpliceSpy(monkeypatch)
    up, down = os.urandom(48 << 20), os.urandom(5 << 20) + b"tail"
    got_b, got_a, outcome = asyncio.run(_exchange(a_family, b_family, up, down))
    assert hashlib.sha256(got_b).digest() == hashlib.sha256(up).digest() and len(got_b) == len(up)
    assert got_a == down
    assert outcome == "closed"
    assert spy.calls > 0


def test_a_short_read_is_not_followed_by_a_read_that_finds_the_socket_empty(monkeypatch):
    """A read that returns fewer bytes than the pipe has room for emptied the socket: the next
    bytes are a readiness event of their own, so no splice is spent on learning EAGAIN (the old
    loop made two such calls per chunk: a syscall and a Python exception each)."""
    spy = SpliceSpy(monkeypatch)
    up = os.urandom(32 << 20)
    got_b, got_a, outcome = asyncio.run(_exchange(socket.AF_UNIX, socket.AF_INET, up, b"down"))
    assert (got_b == up, got_a, outcome) == (True, b"down", "closed")
    assert spy.reads > 0
    assert spy.empty_reads <= spy.reads // 10, (spy.empty_reads, spy.reads)


@pytest.mark.parametrize("a_family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_bytes_and_half_close_that_arrive_together_pass_both_on(monkeypatch, a_family):
    """The last bytes and the peer's half-close queued before the splicer first reads: the short
    read that takes the bytes must not be taken for an empty socket — the EOF came with no
    readiness event of its own after it."""
    SpliceSpy(monkeypatch)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(a_family),
                                                                        await _pair(socket.AF_INET))
        relay.hold(a_writer)
        a_far.sendall(b"last words")
        a_far.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.05)
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        got = await asyncio.wait_for(_receive_to_eof(b_far), 10)
        b_far.shutdown(socket.SHUT_WR)
        return got, await _closed_after(outcome, (a_far, a_writer), (b_far, b_writer))

    assert asyncio.run(scenario()) == (b"last words", "closed")


def test_half_close_one_way_then_the_other_way_still_flows(monkeypatch):
    SpliceSpy(monkeypatch)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        loop = asyncio.get_running_loop()
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        await _send_all_then_eof(a_far, b"request")
        assert await asyncio.wait_for(_receive_to_eof(b_far), 10) == b"request"     # EOF passed on
        await asyncio.sleep(0.05)
        assert not outcome.done()                                                  # the other way is open
        await loop.sock_sendall(b_far, b"answer after the half-close")
        b_far.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(_receive_to_eof(a_far), 10) == b"answer after the half-close"
        assert await asyncio.wait_for(outcome, 10) == "closed"
        for far, writer in ((a_far, a_writer), (b_far, b_writer)):
            writer.close()
            far.close()

    asyncio.run(scenario())


def test_bytes_already_buffered_come_first(monkeypatch):
    SpliceSpy(monkeypatch)
    got_b, got_a, outcome = asyncio.run(_exchange(socket.AF_UNIX, socket.AF_INET, b"then the rest" * 1000, b"ok",
                                                  early=b"header already read|"))
    assert got_b == b"header already read|" + b"then the rest" * 1000
    assert (got_a, outcome) == (b"ok", "closed")


def test_a_socket_the_kernel_cannot_splice_falls_back_to_copying(monkeypatch):
    spy = SpliceSpy(monkeypatch, refuse=True)
    up = os.urandom(8 << 20)
    got_b, got_a, outcome = asyncio.run(_exchange(socket.AF_UNIX, socket.AF_INET, up, b"down"))
    assert (got_b == up, got_a, outcome) == (True, b"down", "closed")
    assert spy.calls >= 2  # each direction tried once, then copied


def test_a_reset_connection_ends_the_relay_with_an_error(monkeypatch):
    SpliceSpy(monkeypatch)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_INET),
                                                                        await _pair(socket.AF_INET))
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        await asyncio.sleep(0.05)
        b_far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        b_far.close()  # RST
        sending = asyncio.create_task(asyncio.get_running_loop().sock_sendall(a_far, b"x" * (4 << 20)))
        result = await asyncio.wait_for(outcome, 10)
        sending.cancel()
        a_writer.close()
        b_writer.close()
        a_far.close()
        return result

    assert asyncio.run(scenario()).startswith("error:")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_small_writes_do_not_stall_a_pipe_full_of_pages(monkeypatch):
    """Each small write is its own socket buffer and takes a pipe page of its own: the pipe fills
    long before its byte capacity, and the splicer must drain it and read on (not wait for a
    readiness edge that already came)."""
    SpliceSpy(monkeypatch)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        messages = [b"%015d\n" % i for i in range(3000)]
        a_far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
        for message in messages[:400]:  # queued before the relay starts: more than the pipe has pages
            a_far.send(message)
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        loop = asyncio.get_running_loop()
        for message in messages[400:]:
            await loop.sock_sendall(a_far, message)
        a_far.shutdown(socket.SHUT_WR)
        got = await asyncio.wait_for(_receive_to_eof(b_far), 20)
        b_far.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(outcome, 10)
        for far, writer in ((a_far, a_writer), (b_far, b_writer)):
            writer.close()
            far.close()
        return got == b"".join(messages), result

    assert asyncio.run(scenario()) == (True, "closed")


def test_small_writes_beyond_the_pipes_pages_arrive_without_more_traffic(monkeypatch):
    """More small socket buffers queued than the pipe has pages, and then silence (a request
    waiting for its answer): the read the pipe's pages cut short is no sign of an empty socket,
    so the splicer reads on once the pipe drains instead of waiting for an event that will not
    come."""
    SpliceSpy(monkeypatch)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        messages = b"".join(b"%015d\n" % i for i in range(600))
        a_far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
        for offset in range(0, len(messages), 16):
            a_far.send(messages[offset:offset + 16])
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        loop, got = asyncio.get_running_loop(), b""
        while len(got) < len(messages):
            got += await asyncio.wait_for(loop.sock_recv(b_far, 1 << 20), 5)
        a_far.shutdown(socket.SHUT_WR)
        b_far.shutdown(socket.SHUT_WR)
        return got == messages, await _closed_after(outcome, (a_far, a_writer), (b_far, b_writer))

    assert asyncio.run(scenario()) == (True, "closed")


def test_concurrent_relays_are_each_byte_exact(monkeypatch):
    SpliceSpy(monkeypatch)

    async def scenario():
        return await asyncio.gather(*(_exchange(socket.AF_UNIX, socket.AF_INET, bytes([i]) * (i * 70001),
                                                b"back %d" % i) for i in range(1, 21)))

    for i, (got_b, got_a, outcome) in enumerate(asyncio.run(scenario()), start=1):
        assert (got_b == bytes([i]) * (i * 70001), got_a, outcome) == (True, b"back %d" % i, "closed")


def test_a_cut_relay_releases_its_pipes_and_sockets(monkeypatch):
    """Cancelling the relay (shutdown, idle) while bytes are in flight stops the splicing at once
    and closes every descriptor it opened; the far ends see the connection end."""
    SpliceSpy(monkeypatch)
    splice.splicer()  # its own epoll descriptor is not the relay's

    async def scenario():
        before = _open_fds()
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        sending = asyncio.create_task(asyncio.get_running_loop().sock_sendall(a_far, b"x" * (64 << 20)))
        await asyncio.sleep(0.2)  # b_far reads nothing: the pipe and both socket buffers are full
        during = _open_fds()
        outcome.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outcome
        a_writer.close()
        b_writer.close()
        await asyncio.sleep(0.05)
        b_far.setblocking(True)
        b_far.settimeout(10)
        while b_far.recv(1 << 20):  # everything the relay had passed on, then the end
            pass
        sending.cancel()
        a_far.close()
        b_far.close()
        return before, during, _open_fds()

    before, during, after = asyncio.run(scenario())
    assert during >= before + 2 + 2 + 2 * 2  # far ends, the relay's sockets and their copies, 2 pipes
    assert after == before


@pytest.mark.parametrize("path", ["spliced", "refused", "no splice"])
def test_a_held_stream_keeps_early_bytes_in_the_kernel_and_relays_them(monkeypatch, path):
    """hold() at accept time: bytes sent while the other side is being connected are not read
    into Python (nothing to copy), and the relay still delivers them — by splicing, or by
    reading the stream again when it copies."""
    SpliceSpy(monkeypatch, refuse=path == "refused")
    if path == "no splice":
        monkeypatch.setattr(splice, "available", lambda: False)

    async def scenario():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        relay.hold(a_writer)
        early = os.urandom(100_000)
        await asyncio.get_running_loop().sock_sendall(a_far, early)
        await asyncio.sleep(0.1)
        unread = len(getattr(a_reader, "_buffer", b"x")) == 0
        outcome = asyncio.create_task(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30))
        a_far.shutdown(socket.SHUT_WR)
        b_far.shutdown(socket.SHUT_WR)
        got = await asyncio.wait_for(_receive_to_eof(b_far), 10)
        result = await asyncio.wait_for(outcome, 10)
        for far, writer in ((a_far, a_writer), (b_far, b_writer)):
            writer.close()
            far.close()
        return unread, got == early, result

    assert asyncio.run(scenario()) == (True, True, "closed")


def test_an_unexpected_failure_ends_only_its_relay_and_the_splicer_serves_on(monkeypatch):
    spy = SpliceSpy(monkeypatch)
    real = spy.real

    def failing_once(*args, **kwargs):
        spy.real = real
        raise RuntimeError("unexpected")

    async def failing_relay():
        (a_far, (a_reader, a_writer)), (b_far, (b_reader, b_writer)) = (await _pair(socket.AF_UNIX),
                                                                        await _pair(socket.AF_INET))
        spy.real = failing_once
        a_far.send(b"the first byte makes the splicer call os.splice")
        outcome = await asyncio.wait_for(relay.relay(a_reader, a_writer, b_reader, b_writer, idle_timeout=30), 10)
        for far, writer in ((a_far, a_writer), (b_far, b_writer)):
            writer.close()
            far.close()
        return outcome

    assert asyncio.run(failing_relay()) == "error: RuntimeError('unexpected')"
    got_b, got_a, outcome = asyncio.run(_exchange(socket.AF_UNIX, socket.AF_INET, b"up" * 50_000, b"down"))
    assert (got_b == b"up" * 50_000, got_a, outcome) == (True, b"down", "closed")
