"""Reliability 4: with Redis down, enqueue fails cleanly and writes nothing; a worker outlives a Redis restart."""

from __future__ import annotations

import json
import time

import pytest
import redis

from jobs import keys
from jobs.queues import PRIORITIES, celery_key
from jobs.store import JobStore
from tests.reliability_helpers import OwnRedis, no_traceback, record_figure, wait_final, write_dataset
from tests.services import wait_until


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path / "own-redis")
    yield server
    server.stop()


def _guild_keys(client) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=keys.PREFIX + "*"))


@pytest.mark.integration
def test_enqueue_with_redis_down_fails_cleanly_and_writes_nothing(own_redis, run_cli, guild_home, tmp_path):
    own_redis.start()
    own_redis.kill()
    down = {"REDIS_URL": own_redis.url}
    files = [str(write_dataset(tmp_path / f"down{i}.jsonl", f"down{i}")) for i in range(3)]

    started = time.monotonic()
    out = run_cli("enqueue", *files, "--campaign", "while-down", extra_env=down)
    failed_in_s = time.monotonic() - started
    assert out.returncode != 0, out
    assert no_traceback(out.stderr) and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach Redis") and "REDIS_URL" in line and "Nothing was enqueued" in line
    listed = run_cli("jobs", "list", extra_env=down)
    assert listed.returncode != 0 and no_traceback(listed.stderr) and "cannot reach Redis" in listed.stderr

    # ---- Redis back: nothing of the failed batch anywhere -----------------------------------------------------------
    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    assert _guild_keys(client) == [] and [client.llen(celery_key(q)) for q in PRIORITIES] == [0, 0, 0]
    datasets = guild_home / "datasets"
    assert not datasets.exists() or not [p for p in datasets.rglob("*") if p.is_file()]
    assert not list((guild_home / "campaigns").glob("*/while-down")) if (guild_home / "campaigns").exists() else True
    ok = run_cli("enqueue", *files, "--campaign", "while-down", "--json", extra_env=down)
    assert ok.returncode == 0, ok.stderr  # and the same files go in once Redis is back (no stale duplicate)
    assert len(json.loads(ok.stdout)) == 3
    stored = [p for p in datasets.rglob("*") if p.is_file()]
    assert len(stored) == 3 and not [p for p in stored if p.name.startswith(".incoming-")]
    record_figure("redis-down-enqueue", runs=1, passes=1, lost=0, enqueue_failed_in_s=round(failed_in_s, 2),
                  exit_code=out.returncode, records_after=0, dataset_copies_after=0)


def test_a_failed_publish_leaves_no_job_behind(store, redis_client, guild_env, tmp_path):
    """A job whose message could not be sent is rolled back: queued without a message it would never run, and it
    would block its campaign and refuse its file as a duplicate (RELIABILITY.md, finding 3)."""
    from kombu.exceptions import OperationalError

    from config.settings import get_settings
    from jobs.submit import SubmitRequest, submit

    files = [str(write_dataset(tmp_path / f"p{i}.jsonl", f"p{i}")) for i in range(2)]
    sent = []

    def publish(job_id: str, priority: str) -> None:
        if sent:  # the broker goes away after the first message
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        sent.append(job_id)

    with pytest.raises(OperationalError):
        submit(get_settings(), store, SubmitRequest(paths=files, campaign="publish-fails"), publish)
    left = {j.id: j.status.value for j in store.list()}
    assert left == {}, f"jobs left without (all) their messages: {left}"
    assert _guild_keys(redis_client) in ([], [keys.JOB_SEQ])


@pytest.mark.integration
@pytest.mark.slow
def test_worker_survives_a_redis_restart(own_redis, run_cli, start_worker, guild_home, tmp_path):
    own_redis.start()
    env = {"REDIS_URL": own_redis.url}
    worker = start_worker("gpu0@redis-restart", env=env)

    own_redis.kill()
    down_at = time.monotonic()
    wait_until(lambda: "Connection to broker lost" in worker.log() or "Cannot connect" in worker.log(), 30,
               what="the worker to notice Redis is gone")
    time.sleep(2)  # a few reconnection attempts against a closed port
    assert worker.proc.poll() is None, worker.log()[-3000:]
    own_redis.start()
    downtime_s = time.monotonic() - down_at

    restarted_at = time.monotonic()
    dataset = write_dataset(tmp_path / "after.jsonl", "after")
    out = run_cli("enqueue", str(dataset), "--set", "max_steps=2", "--set", "eval_fraction=0", "--json",
                  extra_env=env)
    assert out.returncode == 0, out.stderr
    [job_id] = [j["id"] for j in json.loads(out.stdout)]
    store = JobStore(redis.Redis.from_url(own_redis.url), guild_home)
    [job] = wait_final(store, [job_id], timeout_s=90)
    assert job.status.value == "completed", (job.last_error, worker.log()[-3000:])
    assert job.attempts == 1 and job.final_step == 2
    assert worker.proc.poll() is None
    record_figure("redis-restart-worker", runs=1, passes=1, lost=0, redis_down_s=round(downtime_s, 1),
                  restart_to_job_completed_s=round(time.monotonic() - restarted_at, 1))
