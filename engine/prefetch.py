"""Micro-batches built before they are needed: a background thread collates the next optimizer steps' batches
(and pins them in page-locked memory on CUDA) while the current step computes.

The batches are a pure function of the step (:class:`engine.batches.DataOrder`), so building them ahead changes
nothing in what is trained, and a resumed job builds exactly the batches it would have.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from engine.packing import Batch

StepBatches = list[Batch]


class BatchPrefetcher:
    """Yields ``build(step)`` for ``step`` in ``[first, last)`` in order, computed up to ``depth`` steps ahead.

    Args:
        build: the micro-batches of one optimizer step (0-based job step).
        pin: pin each batch's tensors (for asynchronous host-to-GPU copies).
        depth: how many steps may wait, built, in the queue.

    An exception in ``build`` is raised again by :meth:`next` at the step it belongs to. Always :meth:`close`
    (or use it as a context manager): the thread stops at the next step it would build.
    """

    def __init__(self, build: Callable[[int], StepBatches], first: int, last: int, *, pin: bool, depth: int = 2):
        self._build = build
        self._pin = pin
        self._next = first
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first, last), name="guild-prefetch", daemon=True)
        self._thread.start()

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last):
            if self._closed.is_set():
                return
            try:
                batches = self._build(step)
                if self._pin:
                    batches = [b.pin_memory() for b in batches]
                item = (step, batches, None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = (step, None, exc)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def next(self) -> StepBatches:
        """The batches of the next step (waits for them if the thread is behind)."""
        while True:
            try:
                step, batches, error = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the batch prefetch thread ended before step {self._next}") from None
                continue
            if step != self._next:  # pragma: no cover - the thread produces steps in order
                raise RuntimeError(f"prefetched step {step}, expected {self._next}")
            self._next += 1
            if error is not None:
                raise error
            return batches

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
