"""The Celery task: a thin adapter from a queue message to :class:`tasks.lifecycle.JobRunner`."""

from __future__ import annotations

import logging
import threading
import time

from celery.exceptions import Ignore, Reject

from config.settings import get_settings
from jobs.retry import FailureKind, RetryPolicy
from jobs.store import JobStore
from tasks.app import app
from tasks.lifecycle import JobRunner, Outcome, OutcomeKind
from tasks.publish import TASK_NAME, CeleryPublisher

logger = logging.getLogger(__name__)
_runner: JobRunner | None = None


def _get_runner(hostname: str) -> JobRunner:
    global _runner
    if _runner is None:  # one per worker process, so the engine (and its model) stays warm between jobs
        settings = get_settings()
        store = JobStore.connect(settings.redis_url, settings.guild_home, worker=True)
        _runner = JobRunner(settings, store, worker_name=hostname)
    return _runner


class _ProgressEvents:
    """Sends ``task-progress`` events for Flower, at most one a second, from a thread of its own.

    The training thread only drops the latest progress in a slot: sending an event talks to the broker, and a
    broker that stops answering must not stall training. Flower builds its task view from events: a custom event
    type becomes the task's state (PROGRESS) and its fields are merged into the task, so ``result`` carries a
    one-line summary that Flower's task page and task list show while the job runs. The structured fields (step,
    loss, ...) are for other event consumers (``celery events``, a custom receiver).
    """

    def __init__(self, task, min_interval_s: float = 1.0):
        # The task's request is thread-local: read what the events need here, in the task's thread.
        self.app, self.task_id, self.hostname = task.app, task.request.id, task.request.hostname
        self.min_interval_s = min_interval_s
        self._latest: dict | None = None
        self._wake = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._send_loop, daemon=True, name="progress-events")
        self._thread.start()

    def emit(self, progress: dict) -> None:
        self._latest = progress
        self._wake.set()

    def close(self) -> None:
        self._done = True
        self._wake.set()

    def _send_loop(self) -> None:
        while not self._done:
            self._wake.wait()
            self._wake.clear()
            progress, self._latest = self._latest, None
            if progress is None or self._done:
                continue
            summary = (f"step {progress['step']}/{progress['total_steps']} · loss {progress['loss'] or 0:.4f} · "
                       f"{progress['tokens_per_sec'] or 0:.0f} tok/s · ETA {progress['eta_s'] or 0:.0f} s")
            if progress.get("eval_loss") is not None:  # the campaign's eval set (tasks.evaluation.EvalReporter)
                summary += f" · eval {progress['eval_loss']:.4f} @ {progress['eval_step']}"
                if progress.get("sample"):
                    summary += f" · answer: {progress['sample']!r}"
            ranks = {}
            if progress.get("ranks") is not None:  # a multi-rank worker: its rank processes alive
                summary += f" · {progress['ranks']}/{progress['ranks_expected']} ranks"
                ranks = {"ranks": progress["ranks"], "ranks_expected": progress["ranks_expected"]}
            try:
                with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                    dispatcher.send("task-progress", uuid=self.task_id, result=summary, step=progress["step"],
                                    total_steps=progress["total_steps"], loss=progress["loss"],
                                    tokens_per_sec=progress["tokens_per_sec"], eta_s=progress["eta_s"],
                                    eval_loss=progress.get("eval_loss"), eval_step=progress.get("eval_step"),
                                    sample=progress.get("sample"), **ranks)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
                logger.debug("progress event not sent: %s", exc)
            time.sleep(self.min_interval_s)


WAITING_STATE = "WAITING"  # the task state (result backend, Flower) of a delivery that parked its job


def _report_waiting(task, job_id: str, outcome: Outcome) -> None:
    """A parked job is no success: a ``task-waiting`` event (Flower shows the state WAITING and, as the task's
    result, what it waits for) and the same state in the result backend. The message is then acked without a result
    (``Ignore``); the job gets a new one when its turn comes (jobs/waiting.py)."""
    wait = outcome.wait
    fields = {"result": outcome.detail, "waiting_for": wait.after if wait else None,
              "campaign": wait.campaign if wait else None, "until": wait.until if wait else None}
    try:
        task.send_event("task-waiting", **fields)
        task.update_state(task_id=job_id, state=WAITING_STATE, meta={"waiting": outcome.detail})
    except Exception as exc:  # noqa: BLE001 - monitoring only: the wait itself is recorded in the job store
        logger.warning("job %s: waiting state not reported to monitoring: %s", job_id, exc)


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self, job_id: str) -> dict:
    """Train the dataset of job ``job_id``; the Job record (and its frozen plan) in Redis says everything."""
    runner = _get_runner(self.request.hostname or "worker")
    events = _ProgressEvents(self)
    try:
        outcome = runner.run(job_id, republish=CeleryPublisher(app, runner.store), emit=events.emit)
    except Exception as exc:
        if RetryPolicy.classify(exc) is not FailureKind.TRANSIENT:
            raise
        # Redis (broker and job store) broke while this delivery ran. Acked, as a failed task is, the message could
        # be the job's only one: give it back instead. kombu puts it back in its queue now, or, if Redis is still
        # away, it stays in kombu's unacked hash and the sweep puts it back. A second delivery is always harmless.
        logger.warning("job %s: this delivery broke on %s; giving its message back", job_id, exc)
        raise Reject(str(exc), requeue=True) from exc
    finally:
        events.close()
    logger.info("job %s: %s %s", job_id, outcome.action, outcome.detail)
    if outcome.action is OutcomeKind.WAITING:
        _report_waiting(self, job_id, outcome)
        raise Ignore()
    if outcome.replace_worker:
        # The job is recorded as failed. Leaving this child makes the pool start a fresh one (with a fresh CUDA
        # context); Celery reports the exit as a lost worker and requeues the message, which the next worker drops
        # (the job is failed).
        logger.error("job %s: replacing this worker process: its CUDA context is unusable", job_id)
        raise SystemExit(f"job {job_id}: CUDA context unusable; worker process replaced")
    return {"job_id": job_id, "action": outcome.action.value, "detail": outcome.detail}
