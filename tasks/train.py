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


class _ProgressEvents:
    """Sends ``task-progress`` events for Flower, at most one a second.

    Flower builds its task view from events: a custom event type becomes the task's state (PROGRESS) and its
    fields are merged into the task, so ``result`` carries a one-line summary that Flower's task page and
    task list show while the job runs. The structured fields (step, loss, ...) are for other event consumers
    (``celery events``, a custom receiver): Flower's pages and API show only Celery's standard task fields.
    """

    def __init__(self, task, min_interval_s: float = 1.0):
        self.task, self.min_interval_s, self._last = task, min_interval_s, 0.0

    def emit(self, progress: dict) -> None:
        import time

        now = time.monotonic()
        if now - self._last < self.min_interval_s:
            return
        self._last = now
        summary = (f"step {progress['step']}/{progress['total_steps']} · loss {progress['loss'] or 0:.4f} · "
                   f"{progress['tokens_per_sec'] or 0:.0f} tok/s · ETA {progress['eta_s'] or 0:.0f} s")
        try:
            self.task.send_event("task-progress", result=summary, step=progress["step"],
                                 total_steps=progress["total_steps"], loss=progress["loss"],
                                 tokens_per_sec=progress["tokens_per_sec"], eta_s=progress["eta_s"])
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            logger.debug("progress event not sent: %s", exc)


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self, job_id: str) -> dict:
    """Train the dataset of job ``job_id``; the Job record in Redis says everything about it."""
    runner = _get_runner(self.request.hostname or "worker")
    outcome = runner.run(job_id, republish=lambda jid, prio, at_head=False: publish_job(app, jid, prio, at_head),
                         emit=_ProgressEvents(self).emit)
    logger.info("job %s: %s %s", job_id, outcome.action, outcome.detail)
    return {"job_id": job_id, "action": outcome.action, "detail": outcome.detail}
