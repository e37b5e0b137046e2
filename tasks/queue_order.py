"""Strict priority, always: a worker polls ``high`` before ``normal`` before ``low``, also after a pause and resume.

Why it broke (issue 13): kombu's Redis transport with ``queue_order_strategy=priority`` sends one ``BRPOP`` over the
queues in the order the consumer started consuming them (``Channel._active_queues``, in ``basic_consume`` order).
``jobs resume`` sent three ``add_consumer`` remote-control commands, high, normal, low; the worker schedules each
with ``hub.call_soon``, whose pending callbacks are a *set* (kombu/asynchronous/hub.py: ``_ready``), so commands
read in one loop turn run in any order ("Callback ordering is not guaranteed", ``Consumer.call_soon``). A resume
gave ``high low normal`` or ``normal high low``, and a normal job enqueued before a high one started first.

Two fixes, each enough on its own:

* :class:`StrictPriorityCycle` is the transport's queue cycle (``celeryconfig.broker_transport_options``): whatever
  order queues were added in, the ``BRPOP`` lists them high, normal, low (the transport's own order no longer
  matters, also after a reconnection).
* ``jobs resume`` sends one command, :func:`guild_consume_in_order`, which runs as one callback on the worker and
  (re)starts consuming the queues in order, so ``celery inspect active_queues`` shows the order too.
"""

from __future__ import annotations

import logging

from celery.worker.control import control_command, ok

from jobs.queues import CONSUME_IN_ORDER_COMMAND, PRIORITIES, PRIORITY_RANK

logger = logging.getLogger(__name__)


class StrictPriorityCycle:
    """kombu's queue cycle (``update``/``consume``/``rotate``, like ``kombu.utils.scheduling.priority_cycle``) that
    keeps Guild's queues in priority order, and any other queue after them in the order given."""

    def __init__(self, it=None):
        self.items: list[str] = []
        if it is not None:
            self.update(it)

    def update(self, it) -> None:
        items = list(it)
        self.items[:] = sorted(items, key=lambda q: (PRIORITY_RANK.get(q, len(PRIORITIES)), items.index(q)))

    def consume(self, n: int) -> list[str]:
        return self.items[:n]

    def rotate(self, last_used) -> None:
        """Never: the queue a message came from keeps its place (round-robin would move it to the back)."""


@control_command(name=CONSUME_IN_ORDER_COMMAND, args=[("queues", list)], signature="[queues]")
def guild_consume_in_order(state, queues=None, **_kwargs):
    """Consume ``queues`` (default high, normal, low), in that order, as one step on the worker."""
    wanted = [str(q) for q in (queues or PRIORITIES)]
    state.consumer.call_soon(consume_in_order, state.consumer, wanted)
    return ok(f"consuming {','.join(wanted)}")


def consume_in_order(consumer, wanted: list[str]) -> None:
    """Make ``consumer`` (Celery's worker consumer) consume exactly ``wanted``, in that order.

    Queues already consumed in the right order are left alone; otherwise every queue is cancelled and added again
    in order (one callback, so nothing runs in between).
    """
    current = [q.name for q in consumer.task_consumer.queues]
    if current == wanted:
        return
    if current != wanted[:len(current)]:
        for name in current:
            consumer.cancel_task_queue(name)
        current = []
    for name in wanted[len(current):]:
        consumer.add_task_queue(name)
    logger.info("consuming %s, in that order", ",".join(wanted))
