"""The Celery task: a thin adapter from a queue message to :class:`tasks.lifecycle.JobRunner`."""

from __future__ import annotations

import logging

import redis

from config.settings import get_settings
from jobs.store import JobStore
from tasks.app import app
from tasks.lifecycle import JobRunner
from tasks.publish import TASK_NAME, publish_job

logger = logging.getLogger(__name__)
_runner: JobRunner | None = None


def _get_runner(hostname: str) -> JobRunner:
    global _runner
    if _runner is None:  # one per worker process, so the engine (and its model) stays warm between jobs
        settings = get_settings()
        store = JobStore(redis.Redis.from_url(settings.redis_url), settings.guild_home)
        _runner = JobRunner(settings, store, worker_name=hostname)
    return _runner


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self, job_id: str) -> dict:
    """Train the dataset of job ``job_id``; the Job record in Redis says everything about it."""
    runner = _get_runner(self.request.hostname or "worker")
    outcome = runner.run(job_id, republish=lambda jid, prio: publish_job(app, jid, prio))
    logger.info("job %s: %s %s", job_id, outcome.action, outcome.detail)
    return {"job_id": job_id, "action": outcome.action, "detail": outcome.detail}
