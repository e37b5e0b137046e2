"""Recovering jobs whose worker died: every worker sweeps for processing jobs without a fresh heartbeat.

A worker killed with SIGKILL (or a machine that vanished) leaves its job ``processing``. Kombu would
redeliver the unacked message only after the visibility timeout (hours, so long jobs are not run twice);
the sweep notices within ``GUILD_HEARTBEAT_STALE_S`` instead and takes the job over
(``JobStore.take_over_stale``: back to ``queued``, or ``failed`` when its retry policy has no attempt left),
then sends its message again. The claim in the job store makes sure that, whichever message arrives, a job never
runs twice at once.

Two more ways a queued job can be left without a message, both repaired here: a delivery that died before claiming
its job or sending its message again (marked unpublished by the worker: sent again), and a message kombu took for a
worker that never ran it (the broker connection broke in between): it waits in kombu's ``unacked`` hash for the
visibility timeout, so the sweep puts it back in its queue (``JobStore.restore_stranded``).
"""

from __future__ import annotations

import logging
import threading

from config.errors import GuildError
from jobs.job import JobStatus
from jobs.publisher import Publisher

logger = logging.getLogger(__name__)


def sweep_once(store, stale_after_s: float, republish: Publisher) -> list[str]:
    """Take over every processing job with a stale heartbeat (and resend lost messages). Returns their ids."""
    recovered = []
    # An enqueue that died between a job's record and its message (Redis or the CLI killed), or a delivery that died
    # before claiming its job or sending its message again (Redis or the worker killed), left it queued with no
    # message: send it. If the message did go out, the duplicate is harmless (the claim is atomic).
    for job_id in store.unpublished(stale_after_s):
        try:
            job = store.get(job_id)
            if job.status == JobStatus.QUEUED:
                logger.warning("sweep: job %s is queued without a message (its enqueue or a delivery died before "
                               "sending it); sending it", job_id)
                republish(job_id, job.priority)
        except GuildError:  # rolled back since
            pass
        store.mark_published([job_id])
    # A message a worker took but neither ran nor acked (the broker connection broke in between, or the worker died)
    # waits in kombu's unacked hash for the visibility timeout (days): put it back in its queue.
    for job_id in store.restore_stranded(stale_after_s):
        logger.warning("sweep: the message of job %s was stranded in a dead delivery; back in its queue", job_id)
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
    return recovered


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
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
