"""Worker signal handlers: start the lost-job sweeper when a worker is ready, stop it at shutdown."""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown

from config.settings import get_settings
from jobs.queues import PRIORITIES
from jobs.store import JobStore
from tasks.publish import CeleryPublisher
from tasks.sweeper import Sweeper

logger = logging.getLogger(__name__)
_sweeper: Sweeper | None = None


@worker_ready.connect
def start_sweeper(sender=None, **_kwargs) -> None:
    global _sweeper
    from tasks.app import app

    settings = get_settings()
    store = JobStore.connect(settings.redis_url, settings.guild_home, worker=True)
    _sweeper = Sweeper(store, settings.heartbeat_stale_s, settings.sweep_interval_s, CeleryPublisher(app, store),
                       worker_name=getattr(sender, "hostname", "") or "")
    _sweeper.start()
    _stay_paused(sender, store)
    logger.info("lost-job sweeper started (stale after %.0f s)", settings.heartbeat_stale_s)


def _stay_paused(consumer, store: JobStore) -> None:
    """A worker restarted while paused (``python -m jobs pause``) stays paused until ``jobs resume``."""
    name = getattr(consumer, "hostname", "")
    try:
        paused = bool(name) and store.is_paused(name)
    except Exception:  # noqa: BLE001 - Redis down at start: consume; a pause can be asked again
        return
    if paused:
        for queue in PRIORITIES:
            consumer.cancel_task_queue(queue)
        logger.warning("worker %s is paused: consuming nothing until `python -m jobs resume`", name)


@worker_shutdown.connect
def stop_sweeper(**_kwargs) -> None:
    if _sweeper is not None:
        _sweeper.stop()
        if _sweeper.worker_name:
            try:
                _sweeper.store.forget_worker(_sweeper.worker_name)
            except Exception:  # noqa: BLE001
                pass
