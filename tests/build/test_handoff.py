"""Handoff: a worker's items, end and error reach the reader in order; stop frees a blocked worker."""

from __future__ import annotations

import threading

import pytest

from qtbuild.convert.handoff import Handoff


def test_items_then_the_end_in_order():
    handoff: Handoff[int] = Handoff(2)
    worker = threading.Thread(target=lambda: ([handoff.put(i) for i in range(5)], handoff.end()))
    worker.start()
    assert [handoff.get() for _ in range(5)] == list(range(5))
    assert handoff.get() is None
    assert handoff.get() is None  # and stays at the end
    worker.join()


def test_the_error_is_raised_where_it_happened_and_again_after():
    handoff: Handoff[int] = Handoff(4)
    handoff.put(1)
    handoff.fail(ValueError("broken"))
    assert handoff.get() == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="broken"):
            handoff.get()


def test_stop_frees_a_worker_waiting_for_room():
    handoff: Handoff[int] = Handoff(1)
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.extend([handoff.put(1), handoff.put(2)]))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive()  # the second put waits: nobody reads
    handoff.stop()
    worker.join(2)
    assert not worker.is_alive()
    assert results == [True, False]


def test_offer_queues_only_while_there_is_room_and_never_waits():
    handoff: Handoff[int] = Handoff(1)
    assert handoff.offer(1)
    assert not handoff.offer(2)  # full: dropped at once, the caller keeps it
    assert handoff.get() == 1
    assert handoff.offer(3)
    assert handoff.get() == 3
    handoff.stop()
    assert not handoff.offer(4)
