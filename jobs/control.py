"""Steering jobs: cancel and retry."""

from __future__ import annotations

from jobs import keys
from jobs.errors import IllegalTransition
from jobs.job import JobStatus, utc_now
from jobs.store import JobStore


def cancel_job(store: JobStore, job_id: str) -> str:
    """Cancel a job. Queued: cancelled at once (its message is dropped when a worker sees it).
    Processing: a stop request the worker sees at the next step; it checkpoints and marks it cancelled."""
    job = store.get(job_id)
    if job.status == JobStatus.QUEUED:
        store.transition(job_id, JobStatus.CANCELLED, expected={JobStatus.QUEUED}, reason="cancelled by operator",
                         fields={"finished_at": utc_now()})
        return f"{job_id}: cancelled"
    if job.status == JobStatus.PROCESSING:
        store.redis.hset(keys.JOB.format(id=job_id), "stop_request", '"cancel"')
        return f"{job_id}: stop requested; it checkpoints and is cancelled at its next step"
    raise IllegalTransition(f"job {job_id} is {job.status.value}; only queued or processing jobs can be cancelled")


def retry_job(store: JobStore, job_id: str, publish) -> str:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    job = store.transition(job_id, JobStatus.QUEUED, expected={JobStatus.FAILED, JobStatus.CANCELLED},
                           reason="retried by operator", fields={"finished_at": None, "last_error": None})
    store.redis.hdel(keys.JOB.format(id=job_id), "stop_request")
    publish(job_id, job.priority)
    return f"{job_id}: queued again ({job.priority})"
