"""Reliability 3: Redis killed with SIGKILL while 1,000 jobs are being enqueued loses none that was reported queued.

Redis runs with AOF and ``appendfsync always`` (as the embedded one does), so every write it acknowledged is on
disk; restarted on the same data directory and port, it replays the AOF. "Reported as queued" is what the enqueue
loop printed before the kill: ``submit()`` had returned for that file, so its record, indexes and Celery message
were all acknowledged by Redis.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import redis

from jobs import keys
from jobs.store import JobStore
from tests.reliability_helpers import FINAL, OwnRedis, queued_task_ids, record_figure, wait_final, write_dataset
from tests.services import REPO, stop_pid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = 1000
SEED = 20261128
TINY_JOB = ["max_steps=1", "max_length=64", "eval_fraction=0"]
FAST_SWEEP = {"GUILD_HEARTBEAT_STALE_S": "3", "GUILD_SWEEP_INTERVAL_S": "1"}

@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path / "own-redis")
    yield server
    server.stop()


def _write_datasets(directory, n: int) -> None:
    directory.mkdir()
    for i in range(n):
        (directory / f"d{i:04d}.jsonl").write_text(json.dumps({"text": f"sample {i}: {i} squared is {i * i}."}) + "\n")


def test_redis_killed_during_1000_enqueues_loses_nothing_reported(own_redis, guild_env, guild_home, tmp_path,
                                                                   start_worker):
    # Somewhere in the first 40 %: the loop enqueues ~30 files a second, and the test must stay short.
    kill_after = random.Random(SEED).randint(FILES // 10, FILES * 2 // 5)
    datasets = tmp_path / "many"
    _write_datasets(datasets, FILES)
    own_redis.start()
    env = {**guild_env, "REDIS_URL": own_redis.url}
    out_path = tmp_path / "producer.out"

    # ---- enqueue one file at a time; SIGKILL Redis once `kill_after` jobs were reported queued ---------------------
    with open(out_path, "w") as out:
        producer = subprocess.Popen([sys.executable, "-m", "tests.reliability_helpers", "produce", str(datasets), "rk",
                                     *TINY_JOB], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        started = time.monotonic()
        wait_until(lambda: out_path.read_text().count("QUEUED ") >= kill_after or producer.poll() is not None, 120,
                   interval_s=0.01, what=f"{kill_after} jobs enqueued")
        own_redis.kill()
        rate = kill_after / (time.monotonic() - started)
        producer.wait(timeout=60)
    finally:
        stop_pid(producer)
    lines = out_path.read_text().splitlines()
    reported = [line.split(" ", 1)[1] for line in lines if line.startswith("QUEUED ")]
    assert len(reported) >= kill_after and len(reported) < FILES, lines[-5:]
    assert producer.returncode == 1 and lines[-1].startswith("ERROR "), lines[-5:]

    # ---- restart on the same AOF: every reported job is there, with its message -------------------------------------
    restart_started = time.monotonic()
    own_redis.start()
    restart_s = time.monotonic() - restart_started
    client = redis.Redis.from_url(own_redis.url)
    store = JobStore(client, guild_home)
    jobs = {j.id: j for j in store.get_many(reported)}
    missing = [i for i in reported if i not in jobs]
    not_queued = [i for i, j in jobs.items() if j.status.value != "queued"]
    messages = queued_task_ids(client)
    without_message = [i for i in reported if i not in messages]
    assert not missing and not not_queued and not without_message, (missing, not_queued, without_message)
    assert len(messages) == len(set(messages)), "a message was queued twice"
    assert set(i.decode() for i in client.smembers(keys.JOBS_BY_STATUS.format(status="queued"))) >= set(reported)
    # What the interrupted submit left: a job nobody was told about (it runs anyway), or a record without a message.
    unreported = sorted(set(i.decode() for i in client.zrange(keys.JOBS_ALL, 0, -1)) - set(reported))
    unreported_without_message = [i for i in unreported if i not in messages]

    # ---- the replayed messages run: the first two jobs, on a worker started against the restarted Redis -------------
    worker = start_worker("gpu0@after-restart", env={"REDIS_URL": own_redis.url})
    sample = reported[:2]

    def sample_done():
        done = [store.get(i) for i in sample]
        return done if all(j.status.value in FINAL for j in done) else None

    done = wait_until(sample_done, 90, interval_s=0.2, what=f"{sample} to run after the restart")
    assert all(j.status.value == "completed" for j in done), ([j.last_error for j in done], worker.log()[-2000:])
    worker.stop()

    record_figure("redis-killed", runs=1, passes=1, lost=0, files=FILES, reported_queued=len(reported),
                  recovered=len(reported) - len(missing), enqueue_rate_per_s=round(rate), restart_s=round(restart_s, 2),
                  unreported_records=len(unreported), unreported_without_message=len(unreported_without_message),
                  sample_run=len(sample))


def test_redis_dying_between_a_record_and_its_message_loses_no_job(own_redis, guild_home, start_worker, tmp_path):
    """The interleaving the 1,000-enqueue kill hits by chance, made certain: Redis gets SIGKILL as the message of a
    job whose record it has just written is about to be published. Once Redis is back the job is either gone
    entirely or it runs; a queued record that nothing will ever send is the one outcome not allowed."""
    from kombu.exceptions import OperationalError

    from config.settings import get_settings
    from jobs.submit import SubmitRequest, submit

    own_redis.start()
    client = redis.Redis.from_url(own_redis.url, socket_connect_timeout=1)
    store = JobStore(client, guild_home)
    dataset = write_dataset(tmp_path / "interrupted.jsonl", "interrupted")

    def publish_as_redis_dies(job_id: str, priority: str) -> None:
        own_redis.kill()
        raise OperationalError("Error 111 connecting to 127.0.0.1. Connection refused.")

    request = SubmitRequest(paths=[str(dataset)], campaign="interrupted",
                            sets={"max_steps": "1", "max_length": "64", "eval_fraction": "0"})
    with pytest.raises(OperationalError):
        submit(get_settings(), store, request, publish_as_redis_dies)
    own_redis.start()
    left = [i.decode() for i in client.zrange(keys.JOBS_ALL, 0, -1)]
    if left:  # the record survived in the AOF: it must run
        start_worker("gpu0@after-crash", env={"REDIS_URL": own_redis.url, **FAST_SWEEP})
        wait_until(lambda: store.get(left[0]).attempts > 0, 20, what=f"{left[0]} to be taken by a worker")
        [job] = wait_final(store, left, timeout_s=60)
        assert job.status.value == "completed", job.last_error
