"""Reliability 8: Redis stops answering for 10 s in the middle of a job (SIGSTOP, then SIGCONT).

The worker's Redis clients have socket timeouts, the training thread never talks to Redis (a beat thread writes
progress and heartbeats, catching every error), and Celery is told not to cancel a running task when its broker
connection drops (``worker_cancel_long_running_tasks_on_connection_loss = False``). So the job trains through the
outage, completes in one attempt with no restart from a checkpoint, and its message is delivered once.

The worker trains with the stand-in engine (``GUILD_ENGINE_FACTORY``: 50 ms a step, no torch), which logs every step
with the time, so the test can see that steps went on while Redis was stopped.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import redis

from jobs.store import JobStore
from tests.reliability_helpers import (
    OwnRedis,
    enqueue_ids,
    queued_task_ids,
    record_figure,
    unacked_task_ids,
    wait_final,
    write_dataset,
)
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 10
STEPS = 300  # 50 ms each: about 15 s, so the outage falls well inside the job
STANDIN = {"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"}


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path / "own-redis")
    yield server
    server.stop()


def test_a_redis_pause_mid_job_costs_nothing(own_redis, run_cli, start_worker, guild_home, tmp_path):
    own_redis.start()
    env = {"REDIS_URL": own_redis.url, **STANDIN}
    worker = start_worker("gpu0@redis-pause", env=env)
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, guild_home)
    dataset = write_dataset(tmp_path / "pause.jsonl", "pause")
    [job_id] = enqueue_ids(run_cli, str(dataset), "--set", f"max_steps={STEPS}", "--set", "save_steps=50",
                           extra_env=env)
    wait_until(lambda: (store.get(job_id).progress or {}).get("step", 0) >= 20, 60, what=f"{job_id} at step 20")

    # ---- Redis stops answering (the process is frozen; its sockets stay open) --------------------------------------
    pid = own_redis.servers[-1].proc.pid
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        time.sleep(OUTAGE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.time()

    [job] = wait_final(store, [job_id], timeout_s=120)
    assert job.status.value == "completed", (job.last_error, worker.log()[-3000:])
    assert job.attempts == 1 and job.start_step == 0 and job.final_step == STEPS
    assert job.metadata.get("resume_from") is None, "the job restarted from a checkpoint"
    assert [h["to"] for h in store.history(job_id)] == ["queued", "processing", "completed"]

    # Training went on while Redis was stopped: the stand-in logs each step with the time it ran.
    log = worker.log()
    step_times = [float(t) for t in re.findall(rf"stand-in {re.escape(job_id)}: step \d+/\d+ at ([\d.]+)", log)]
    during = [t for t in step_times if stopped_at < t < resumed_at]
    assert len(step_times) == STEPS and len(during) >= 1, (len(step_times), len(during))
    # Delivered once, acked, nothing left behind; the worker survived.
    wait_until(lambda: job_id not in queued_task_ids(client) + unacked_task_ids(client), 30,
               what="the message acked")
    assert log.count(f"guild.train[{job_id}] received") == 1, "the message was delivered again"
    assert worker.proc.poll() is None
    record_figure("redis-paused", runs=1, passes=1, lost=0, outage_s=OUTAGE_S, steps_during_outage=len(during),
                  attempts=job.attempts, deliveries=1, heartbeat_failures=log.count("heartbeat failed"))
