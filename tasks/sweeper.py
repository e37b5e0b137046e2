"""Recovering jobs whose worker died: every worker sweeps for processing jobs without a fresh heartbeat.

A worker killed with SIGKILL (or a machine that vanished) leaves its job ``processing``. Kombu would
redeliver the unacked message only after the visibility timeout (hours, so long jobs are not run twice);
the sweep notices within ``GUILD_HEARTBEAT_STALE_S`` instead, puts the job back to ``queued`` and sends
its message again. The claim in the job store makes sure that, whichever message arrives, a job never runs
twice at once. A job that has used up ``queue.max_attempts`` fails instead of looping.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from config.errors import GuildError
from jobs import keys
from jobs.job import JobStatus, utc_now
from jobs.store import JobStore

logger = logging.getLogger(__name__)
DEFAULT_MAX_ATTEMPTS = 3


def max_attempts_of(job) -> int:
    config = (job.metadata or {}).get("config") or {}
    return int((config.get("queue") or {}).get("max_attempts") or DEFAULT_MAX_ATTEMPTS)


def sweep_once(store: JobStore, stale_after_s: float, republish) -> list[str]:
    """Requeue (or fail, past max_attempts) every processing job with a stale heartbeat. Returns their ids."""
    recovered = []
    # An enqueue that died between a job's record and its message (Redis or the CLI killed) left it queued with
    # no message: send it. If the message did go out, the duplicate is harmless (the claim is atomic).
    for job_id in store.unpublished(stale_after_s):
        try:
            job = store.get(job_id)
            if job.status == JobStatus.QUEUED:
                logger.warning("sweep: job %s was enqueued without its message; sending it", job_id)
                republish(job_id, job.priority)
        except GuildError:  # rolled back since
            pass
        store.mark_published([job_id])
    for job_id in store.stale_processing(stale_after_s):
        try:
            job = store.get(job_id)
            worker = store.runtime(job_id)["worker"]
            reason = f"worker {worker} lost: no heartbeat for {stale_after_s:.0f} s"
            if job.attempts >= max_attempts_of(job):
                store.transition(job_id, JobStatus.FAILED, expected={JobStatus.PROCESSING},
                                 reason=reason + f"; gave up after {job.attempts} attempts",
                                 fields={"last_error": f"{reason}; gave up after {job.attempts} attempts",
                                         "finished_at": utc_now(), "progress": None})
            else:
                store.mark_unpublished(job_id)
                store.transition(job_id, JobStatus.QUEUED, expected={JobStatus.PROCESSING}, reason=reason,
                                 fields={"progress": None, "last_error": reason})
                republish(job_id, job.priority)
                store.mark_published([job_id])
            recovered.append(job_id)
        except GuildError as exc:  # someone else recovered it first
            logger.info("sweep: %s: %s", job_id, exc)
    return recovered


class Sweeper(threading.Thread):
    """Runs :func:`sweep_once` every ``interval_s`` in the worker's main process."""

    def __init__(self, store: JobStore, stale_after_s: float, interval_s: float, republish, worker_name: str = ""):
        super().__init__(daemon=True, name="guild-sweeper")
        self.store, self.stale_after_s, self.interval_s, self.republish = store, stale_after_s, interval_s, republish
        self.worker_name = worker_name
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                if self.worker_name:  # a sign of life, for preemption and `doctor`
                    self.store.redis.hset(keys.WORKERS, self.worker_name, time.time())
                for job_id in sweep_once(self.store, self.stale_after_s, self.republish):
                    logger.warning("recovered job %s from a lost worker", job_id)
            except redis.RedisError as exc:
                logger.warning("sweep skipped: %s", exc)
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
