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
        request_stop(store, job_id, "cancel")
        return f"{job_id}: stop requested; it checkpoints and is cancelled at its next step"
    raise IllegalTransition(f"job {job_id} is {job.status.value}; only queued or processing jobs can be cancelled")


def retry_job(store: JobStore, job_id: str, publish) -> str:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    job = store.transition(job_id, JobStatus.QUEUED, expected={JobStatus.FAILED, JobStatus.CANCELLED},
                           reason="retried by operator", fields={"finished_at": None, "last_error": None})
    store.redis.hdel(keys.JOB.format(id=job_id), "stop_request")
    store.mark_unpublished(job_id)
    publish(job_id, job.priority)
    store.mark_published([job_id])
    return f"{job_id}: queued again ({job.priority})"


def live_workers(store: JobStore, stale_after_s: float) -> list[str]:
    """Workers that showed a sign of life (their sweep) within ``stale_after_s``."""
    import time

    now = time.time()
    return sorted(name.decode() for name, seen in store.redis.hgetall(keys.WORKERS).items()
                  if now - float(seen) < stale_after_s)


def request_stop(store: JobStore, job_id: str, reason: str) -> None:
    """Ask the worker running ``job_id`` to checkpoint and stop at its next step (reason: pause, preempt...)."""
    store.redis.hset(keys.JOB.format(id=job_id), "stop_request", f'"{reason}"')


def running_jobs(store: JobStore, worker: str | None = None) -> list:
    jobs = store.list(status="processing")
    if worker is None:
        return jobs
    return [j for j in jobs if store.runtime(j.id)["worker"] == worker]


def preempt_low_if_needed(store: JobStore, stale_after_s: float) -> str | None:
    """When every live worker is busy with a low job, ask the newest low job to step aside.

    It checkpoints, goes back to the head of ``low`` with its attempts unchanged, and resumes from its
    checkpoint once a worker is free. Returns the preempted job's id, or None when nothing was preempted.
    """
    workers = live_workers(store, stale_after_s)
    running = store.list(status="processing")
    if not workers or len(running) < len(workers):
        return None  # a worker is idle: the high job will start without preempting anyone
    if any(j.priority != "low" for j in running):
        return None
    if any(store.redis.hget(keys.JOB.format(id=j.id), "stop_request") for j in running):
        return None  # one is already stepping aside
    newest = max(running, key=lambda j: j.started_at or "")
    request_stop(store, newest.id, "preempt")
    return newest.id


def pause_workers(app, store: JobStore, worker: str | None) -> list[str]:
    """Stop consuming on ``worker`` (or every worker); their running jobs checkpoint and requeue at the head."""
    destination = [worker] if worker else None
    for queue in keys.PRIORITIES:
        app.control.cancel_consumer(queue, destination=destination, reply=False)
    names = [worker] if worker else [w.decode() for w in store.redis.hkeys(keys.WORKERS)]
    if names:
        store.redis.sadd(keys.CONTROL_PAUSED, *names)
    stopped = []
    for job in running_jobs(store, worker):
        request_stop(store, job.id, "pause")
        stopped.append(job.id)
    return stopped


def resume_workers(app, store: JobStore, worker: str | None) -> None:
    """Start consuming again, in strict order high, normal, low."""
    destination = [worker] if worker else None
    for queue in keys.PRIORITIES:
        app.control.add_consumer(queue, destination=destination, reply=False)
    if worker:
        store.redis.srem(keys.CONTROL_PAUSED, worker)
    else:
        store.redis.delete(keys.CONTROL_PAUSED)
