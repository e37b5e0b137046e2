"""The sweep, on the in-memory store: stale jobs are taken over (or failed), lost messages resent."""

from jobs.job import Job, JobStatus
from jobs.memory_store import MemoryJobStore
from tasks.sweeper import sweep_once


class Clock:
    now = 1_000_000.0

    def __call__(self):
        return self.now


def _job(job_id):
    return Job(id=job_id, dataset_path="/d", hero_id="tiny-qwen3", campaign_id="c", priority="low")


def test_sweep_requeues_stale_jobs_fails_exhausted_ones_and_resends_lost_messages(tmp_path):
    clock = Clock()
    store = MemoryJobStore(tmp_path, clock=clock)
    stale, exhausted, live, lost = (store.create(_job(i), i) for i in ("stale", "exhausted", "live", "lost"))
    store.mark_published([stale.id, exhausted.id, live.id])
    for job in (stale, exhausted, live):
        store.claim(job.id, "w", token=job.id)
    store.update(exhausted.id, attempts=3)
    clock.now += 61
    store.beat(live.id, live.id)
    sent = []
    recovered = sweep_once(store, 60, lambda job_id, priority, at_head=False: sent.append((job_id, priority)))
    assert sorted(recovered) == ["exhausted", "stale"]
    assert sent == [("lost", "low"), ("stale", "low")]
    assert store.get("stale").status is JobStatus.QUEUED and store.get("stale").attempts == 1
    assert store.get("exhausted").status is JobStatus.FAILED and "gave up after 3 attempts" in \
        store.get("exhausted").last_error
    assert store.get("live").status is JobStatus.PROCESSING
    assert store.unpublished(0) == []
    assert sweep_once(store, 60, lambda *a, **k: sent.append(a)) == [] and len(sent) == 2


def test_of_several_workers_one_sweeps_each_interval_and_every_one_is_seen(tmp_path, monkeypatch):
    import threading
    import time

    import tasks.sweeper as sweeper

    store = MemoryJobStore(tmp_path)
    sweeps, lock = [], threading.Lock()

    def counted(*args):
        with lock:
            sweeps.append(time.monotonic())
        return []

    monkeypatch.setattr(sweeper, "sweep_once", counted)
    threads = [sweeper.Sweeper(store, 60, 0.5, lambda *a, **k: None, worker_name=f"gpu{i}@h") for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1.2)
    for thread in threads:
        thread.stop()
    for thread in threads:
        thread.join(5)
    elapsed = time.monotonic() - started
    assert set(store.workers()) == {f"gpu{i}@h" for i in range(4)}
    assert 1 <= len(sweeps) <= int(elapsed / 0.5) + 1  # four workers, about one sweep per interval in all
