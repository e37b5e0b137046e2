"""Sending a job's message to the queue of its priority (the only place that does)."""

from __future__ import annotations

from pathlib import PurePath

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
        self.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=priority, routing_key=priority,
                           kwargsrepr=self._shown(job_id, priority))
        if at_head:
            self.store.move_message_to_head(priority, job_id)

    def _shown(self, job_id: str, priority: str) -> str:
        """What monitoring shows as the task's kwargs: priority, campaign, dataset and hero.

        Display only: ``kwargsrepr`` is a message header that Celery copies into the task-sent and task-received
        events (Flower's "kwargs"); the task gets no kwargs, the job id stays its only input, and everything else
        comes from the job store.
        """
        shown = {"priority": priority}
        try:
            job = self.store.get(job_id)
            source = job.metadata.get("source_path") or job.dataset_path
            shown.update(campaign=job.campaign_id, dataset=PurePath(source).name, hero=job.hero_id)
        except Exception:  # noqa: BLE001 - the message matters, its label does not
            pass
        return repr(shown)
