"""Recovering jobs whose worker died: every worker sweeps for processing jobs without a fresh heartbeat.

A worker killed with SIGKILL (or a machine that vanished) leaves its job ``processing``. Kombu would
redeliver the unacked message only after the visibility timeout (hours, so long jobs are not run twice);
the sweep notices within ``GUILD_HEARTBEAT_STALE_S`` instead and takes the job over
(``JobStore.take_over_stale``: back to ``queued``, or ``failed`` when its retry policy has no attempt left),
then sends its message again. The claim in the job store makes sure that, whichever message arrives, a job never
runs twice at once.

Parked jobs (jobs/waiting.py) get their message back here too: a job whose retry backoff is over (checked about
once a second, :func:`release_due`), and, once per sweep, the first queued job of every campaign that has parked
jobs and that nobody holds (a cancelled head, a dead worker's lease that ran out: anything the run that frees a
campaign does not see).
"""

from __future__ import annotations

import logging
import threading
import time

from config.errors import GuildError
from jobs.job import JobStatus
from jobs.publisher import Publisher

logger = logging.getLogger(__name__)
WAKE_POLL_S = 1.0  # how often a worker looks for parked jobs whose backoff is over (one ZRANGEBYSCORE)


def sweep_once(store, stale_after_s: float, republish: Publisher) -> list[str]:
    """Take over every processing job with a stale heartbeat (and resend lost messages). Returns their ids."""
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
            status = store.take_over_stale(job_id, stale_after_s, resend=True)
            if status is JobStatus.QUEUED:
                republish(job_id, store.get(job_id).priority)
                store.mark_published([job_id])
            if status is not None:
                recovered.append(job_id)
        except GuildError as exc:
            logger.info("sweep: %s: %s", job_id, exc)
    release_due(store, republish)
    for campaign_id in sorted({w.campaign for w in store.waiting().values()}):
        _send(store, republish, store.wake_head(campaign_id), f"campaign {campaign_id} is free")
    return recovered


def release_due(store, republish: Publisher) -> list[str]:
    """Send the message of every parked job whose retry backoff is over. Returns their ids."""
    released = store.release_due()
    for job_id in released:
        _send(store, republish, job_id, "its retry backoff is over")
    return released


def _send(store, republish: Publisher, job_id: str | None, why: str) -> None:
    """Send a woken job's message at the head of its queue (it has waited its turn already)."""
    if job_id is None:
        return
    try:
        republish(job_id, store.get(job_id).priority, at_head=True)
        store.mark_published([job_id])
        logger.info("sweep: woke job %s (%s)", job_id, why)
    except GuildError as exc:  # deleted meanwhile
        logger.info("sweep: %s: %s", job_id, exc)


class Sweeper(threading.Thread):
    """Runs :func:`sweep_once` every ``interval_s`` in the worker's main process, and registers the worker as alive
    (for preemption and ``doctor``)."""

    def __init__(self, store, stale_after_s: float, interval_s: float, republish: Publisher, worker_name: str = ""):
        super().__init__(daemon=True, name="guild-sweeper")
        self.store, self.stale_after_s, self.interval_s, self.republish = store, stale_after_s, interval_s, republish
        self.worker_name = worker_name
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                if self.worker_name:
                    self.store.worker_seen(self.worker_name)
                for job_id in sweep_once(self.store, self.stale_after_s, self.republish):
                    logger.warning("recovered job %s from a lost worker", job_id)
            except Exception as exc:  # noqa: BLE001 - Redis down: sweep again next time
                logger.warning("sweep skipped: %s", exc)
            if self._wait_releasing_due():
                return

    def _wait_releasing_due(self) -> bool:
        """Until the next sweep, release parked jobs whose backoff is over about once a second. True: stop."""
        deadline = time.monotonic() + self.interval_s
        while (left := deadline - time.monotonic()) > 0:
            if self._stop_event.wait(min(WAKE_POLL_S, left)):
                return True
            try:
                release_due(self.store, self.republish)
            except Exception as exc:  # noqa: BLE001 - Redis down: the next poll tries again
                logger.debug("release of due jobs skipped: %s", exc)
        return self._stop_event.is_set()

    def stop(self) -> None:
        self._stop_event.set()
