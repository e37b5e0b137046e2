"""Sending a job's message to the queue of its priority (the only place that does)."""

from __future__ import annotations

from jobs.queues import PRIORITIES

TASK_NAME = "guild.train"


class CeleryPublisher:
    """The :class:`jobs.publisher.Publisher` of a Celery app: sends ``guild.train(job_id)`` with ``task_id`` = the
    job id to the queue named after the priority.

    Args:
        app: the Celery app (its broker is the Redis of the job store).
        store: the job store; moves a message to the head of its queue (``at_head``).
    """

    def __init__(self, app, store):
        self.app, self.store = app, store

    def __call__(self, job_id: str, priority: str, at_head: bool = False) -> None:
        """Args:
            at_head: put it before every other message of that queue (a paused or preempted job resumes first).
        """
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        self.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=priority, routing_key=priority)
        if at_head:
            self.store.move_message_to_head(priority, job_id)
