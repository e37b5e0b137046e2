"""Steering jobs and workers: cancel, retry, pause, resume, preempt.

Pausing also needs Celery's remote control (stop or start consuming a queue): the caller passes ``consumers``,
anything with ``cancel_consumer(queue, destination=..., reply=...)`` and ``broadcast(command, arguments=...,
destination=..., reply=...)`` (``app.control``), so this package never imports Celery.
"""

from __future__ import annotations

from jobs.errors import IllegalTransition
from jobs.job import Job, JobStatus, StopReason, utc_now
from jobs.publisher import Publisher
from jobs.queues import CONSUME_IN_ORDER_COMMAND, PRIORITIES


def cancel_job(store, job_id: str) -> str:
    """Cancel a job. Queued: cancelled at once (its message is dropped when a worker sees it).
    Processing: a stop request the worker sees at the next step; it checkpoints and marks it cancelled."""
    job = store.get(job_id)
    if job.status == JobStatus.QUEUED:
        store.transition(job_id, JobStatus.CANCELLED, expected={JobStatus.QUEUED}, reason="cancelled by operator",
                         fields={"finished_at": utc_now()})
        return f"{job_id}: cancelled"
    if job.status == JobStatus.PROCESSING:
        store.request_stop(job_id, StopReason.CANCEL)
        return f"{job_id}: stop requested; it checkpoints and is cancelled at its next step"
    raise IllegalTransition(f"job {job_id} is {job.status.value}; only queued or processing jobs can be cancelled")


def retry_job(store, job_id: str, publish: Publisher) -> str:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    job = store.transition(job_id, JobStatus.QUEUED, expected={JobStatus.FAILED, JobStatus.CANCELLED},
                           reason="retried by operator",
                           fields={"finished_at": None, "last_error": None, "stop_request": None})
    store.mark_unpublished(job_id)
    publish(job_id, job.priority)
    store.mark_published([job_id])
    return f"{job_id}: queued again ({job.priority})"


def running_jobs(store, worker: str | None = None) -> list[Job]:
    jobs = store.list(status="processing")
    if worker is None:
        return jobs
    return [j for j in jobs if store.runtime(j.id).worker == worker]


def preempt_low_if_needed(store, stale_after_s: float) -> str | None:
    """When every live worker is busy with a low job, ask the newest low job to step aside.

    It checkpoints, goes back to the head of ``low`` with its attempts unchanged, and resumes from its
    checkpoint once a worker is free. Returns the preempted job's id, or None when nothing was preempted.
    """
    workers = store.live_workers(stale_after_s)
    running = store.list(status="processing")
    if not workers or len(running) < len(workers):
        return None  # a worker is idle: the high job will start without preempting anyone
    if any(j.priority != "low" for j in running):
        return None
    if any(store.stop_reason(j.id) for j in running):
        return None  # one is already stepping aside
    newest = max(running, key=lambda j: j.started_at or "")
    store.request_stop(newest.id, StopReason.PREEMPT)
    return newest.id


def pause_workers(consumers, store, worker: str | None) -> list[str]:
    """Stop consuming on ``worker`` (or every worker); their running jobs checkpoint and requeue at the head."""
    destination = [worker] if worker else None
    for queue in PRIORITIES:
        consumers.cancel_consumer(queue, destination=destination, reply=False)
    store.pause_workers([worker] if worker else sorted(store.workers()))
    stopped = []
    for job in running_jobs(store, worker):
        store.request_stop(job.id, StopReason.PAUSE)
        stopped.append(job.id)
    return stopped


def resume_workers(consumers, store, worker: str | None) -> None:
    """Start consuming again, in strict order high, normal, low.

    One command that the worker runs as one step (``tasks.queue_order``), not one ``add_consumer`` per queue: the
    worker runs remote-control commands read together in any order, and the order it consumes in is the order
    queues were added.
    """
    destination = [worker] if worker else None
    consumers.broadcast(CONSUME_IN_ORDER_COMMAND, arguments={"queues": list(PRIORITIES)}, destination=destination,
                        reply=False)
    store.resume_workers([worker] if worker else None)
