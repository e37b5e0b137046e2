"""Sending a job's message to the queue of its priority (the only place that does)."""

from __future__ import annotations

from jobs.keys import PRIORITIES

TASK_NAME = "guild.train"


def publish_job(app, job_id: str, priority: str) -> None:
    """Send the training task for ``job_id`` to queue ``priority``, with ``task_id`` = the job id."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=priority, routing_key=priority)
