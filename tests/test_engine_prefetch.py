"""engine.prefetch: batches come in step order, an error comes at its own step, and closing stops the thread."""

from __future__ import annotations

import threading

import pytest

from engine.prefetch import BatchPrefetcher


def test_steps_come_in_order_from_first_to_last():
    with BatchPrefetcher(lambda step: [step, step * 10], 3, 7, pin=False) as prefetch:
        assert [prefetch.next() for _ in range(4)] == [[3, 30], [4, 40], [5, 50], [6, 60]]


def test_built_on_another_thread_ahead_of_use():
    built = threading.Event()
    names = []

    def build(step):
        names.append(threading.current_thread().name)
        built.set()
        return [step]

    with BatchPrefetcher(build, 0, 3, pin=False, depth=2) as prefetch:
        assert built.wait(10)  # before anyone asked
        assert prefetch.next() == [0]
    assert names and all(n == "guild-prefetch" for n in names)


def test_an_error_is_raised_at_its_own_step():
    def build(step):
        if step == 2:
            raise ValueError("bad row at step 2")
        return [step]

    with BatchPrefetcher(build, 0, 5, pin=False) as prefetch:
        assert prefetch.next() == [0] and prefetch.next() == [1]
        with pytest.raises(ValueError, match="bad row at step 2"):
            prefetch.next()


def test_close_stops_the_thread_even_when_batches_wait_unread():
    prefetch = BatchPrefetcher(lambda step: [step], 0, 10**6, pin=False, depth=1)
    assert prefetch.next() == [0]
    prefetch.close()
    assert not prefetch._thread.is_alive()
