"""The job store's contract, run against the Redis store and the in-memory one; then what only Redis can show
(a wrong key type, the layout check, the message list)."""

import inspect
import json

import pytest

from jobs import keys
from jobs.errors import DuplicateDataset, IllegalTransition, NotOwner, StoreLayoutError, UnknownJob
from jobs.job import Job, JobStatus, StopReason
from jobs.memory_store import MemoryJobStore
from jobs.queues import celery_key
from jobs.retry import RetryPolicy
from jobs.store import JobStore
from jobs.waiting import Wait


def _job(job_id="20260101T000000_a", priority="normal", campaign="c1"):
    return Job(id=job_id, dataset_path="/d", hero_id="tiny-qwen3", campaign_id=campaign, priority=priority)


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=["redis", "memory"])
def any_store(request, guild_home):
    """Each contract test runs on both stores; the Redis one on the session's real redis-server."""
    clock = Clock()
    if request.param == "memory":
        store = MemoryJobStore(guild_home, clock=clock)
    else:
        redis_client = request.getfixturevalue("redis_client")
        store = JobStore(redis_client, guild_home, clock=clock)
    store.clock = clock
    return store


# --------------------------------------------------------------------------------------------------- contract


def test_create_makes_ids_unique_and_indexes(any_store):
    a = any_store.create(_job(), "sha-a")
    b = any_store.create(_job(), "sha-b")
    assert a.id == "20260101T000000_a" and b.id == "20260101T000000_a-2"
    assert [j.id for j in any_store.list(status="queued")] == [a.id, b.id]
    assert any_store.queued_in_order() == [a.id, b.id]
    assert any_store.campaign_pending("c1") == [a.id, b.id] and any_store.campaign_head("c1") == a.id
    assert any_store.status_counts()["queued"] == 2
    assert [s["id"] for s in any_store.queue_summaries()] == [a.id, b.id]
    assert any_store.unpublished(0) == [a.id, b.id]
    any_store.mark_published([a.id, b.id])
    assert any_store.unpublished(0) == []


def test_duplicate_content_refused_unless_forced(any_store):
    first = any_store.create(_job(), "same")
    assert any_store.live_owner("same") == first.id and any_store.live_owner("other") is None
    with pytest.raises(DuplicateDataset, match=first.id):
        any_store.create(_job(), "same")
    assert any_store.create(_job(), "same", force=True).id != first.id


def test_queue_order_is_priority_then_age(any_store):
    low = any_store.create(_job("l", "low"), "1")
    normal = any_store.create(_job("n", "normal"), "2")
    high = any_store.create(_job("h", "high"), "3")
    assert any_store.queued_in_order() == [high.id, normal.id, low.id]


def test_claim_is_atomic_and_counts_attempts(any_store):
    job = any_store.create(_job(), "x")
    claimed = any_store.claim(job.id, "w1", token="t1")
    assert claimed.status is JobStatus.PROCESSING and claimed.attempts == 1 and claimed.started_at
    assert any_store.claim(job.id, "w2") is None  # a redelivered message never runs it twice at once
    runtime = any_store.runtime(job.id)
    assert runtime.worker == "w1" and runtime.claim == "t1" and runtime.heartbeat_at == any_store.clock.now
    assert any_store.campaign_head("c1") is None  # processing is not queued


def test_claim_takes_over_a_job_whose_worker_died(any_store):
    job = any_store.create(_job(), "x")
    any_store.claim(job.id, "w1", token="t1")
    any_store.clock.now += 61
    assert any_store.stale_processing(60) == [job.id]
    again = any_store.claim(job.id, "w2", token="t2", stale_after_s=60)
    assert again is not None and again.attempts == 2
    reasons = [h["reason"] for h in any_store.history(job.id)]
    assert any("w1 lost" in r for r in reasons)
    # The old run comes back: every write it makes is refused, the new owner's record stands.
    assert not any_store.beat(job.id, "t1", {"step": 99}).owned
    with pytest.raises(NotOwner):
        any_store.transition(job.id, JobStatus.COMPLETED, owner="t1", fields={"final_step": 99})
    with pytest.raises(NotOwner):
        any_store.update(job.id, owner="t1", start_step=99)
    assert any_store.get(job.id).progress is None and any_store.get(job.id).start_step is None
    assert any_store.beat(job.id, "t2", {"step": 3}).owned and any_store.get(job.id).progress == {"step": 3}


def test_a_takeover_costs_no_extra_attempt_and_fails_past_max_attempts(any_store):
    job = any_store.create(_job(), "x")
    policy = RetryPolicy(max_attempts=2)
    any_store.claim(job.id, "w1", token="a", policy=policy)
    any_store.clock.now += 100
    assert any_store.take_over_stale(job.id, 60, policy) is JobStatus.QUEUED
    assert any_store.get(job.id).attempts == 1
    any_store.claim(job.id, "w2", token="b", policy=policy)
    any_store.clock.now += 100
    assert any_store.claim(job.id, "w3", token="c", stale_after_s=60, policy=policy) is None
    failed = any_store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 2
    assert "gave up after 2 attempts" in failed.last_error


def test_a_fresh_heartbeat_is_not_taken_over(any_store):
    job = any_store.create(_job(), "x")
    any_store.claim(job.id, "w1", token="t1")
    any_store.clock.now += 30
    assert any_store.beat(job.id, "t1").owned
    any_store.clock.now += 45  # 75 s after the claim, 45 s after the beat
    assert any_store.take_over_stale(job.id, 60) is None and any_store.stale_processing(60) == []
    assert any_store.get(job.id).status is JobStatus.PROCESSING


def test_transition_checks_state_machine_and_writes_history(any_store, guild_home):
    job = any_store.create(_job(), "x")
    with pytest.raises(IllegalTransition):
        any_store.transition(job.id, JobStatus.COMPLETED)
    any_store.claim(job.id, "w", token="t")
    any_store.transition(job.id, JobStatus.COMPLETED, fields={"final_step": 7}, reason="trained", owner="t")
    done = any_store.get(job.id)
    assert done.status is JobStatus.COMPLETED and done.final_step == 7
    assert any_store.list(status="processing") == [] and any_store.queued_in_order() == []
    assert any_store.campaign_pending("c1") == []
    assert [h["to"] for h in any_store.history(job.id)] == ["queued", "processing", "completed"]
    lines = (guild_home / "logs" / "job-history.jsonl").read_text().splitlines()
    assert [json.loads(x)["to"] for x in lines] == ["queued", "processing", "completed"]


def test_stop_requests_are_typed(any_store):
    job = any_store.create(_job(), "x")
    any_store.claim(job.id, "w", token="t")
    assert any_store.stop_reason(job.id) is None
    any_store.request_stop(job.id, StopReason.PAUSE)
    assert any_store.stop_reason(job.id) is StopReason.PAUSE
    assert any_store.beat(job.id, "t").stop is StopReason.PAUSE
    any_store.clear_stop(job.id)
    assert any_store.stop_reason(job.id) is None


def test_delete_leaves_nothing_of_the_job(any_store):
    job = any_store.create(_job(), "x")
    other = any_store.create(_job("keep"), "y")
    any_store.delete(job.id)
    assert not any_store.exists(job.id) and any_store.live_owner("x") is None
    assert any_store.queued_in_order() == [other.id] and any_store.campaign_pending("c1") == [other.id]
    assert any_store.unpublished(0) == [other.id] and any_store.status_counts()["queued"] == 1
    assert [s["id"] for s in any_store.queue_summaries()] == [other.id]
    any_store.delete("no-such-job")  # nothing to do


def test_campaign_lock_lease(any_store):
    assert any_store.acquire_campaign_lock("c", "a", 60)
    assert not any_store.acquire_campaign_lock("c", "b", 60) and any_store.campaign_lock_holder("c") == "a"
    assert any_store.renew_campaign_lock("c", "a", 60) and not any_store.renew_campaign_lock("c", "b", 60)
    any_store.release_campaign_lock("c", "b")  # not the holder: nothing happens
    assert any_store.campaign_locks() == {"c": "a"}
    any_store.release_campaign_lock("c", "a")
    assert any_store.campaign_lock_holder("c") is None and any_store.acquire_campaign_lock("c", "b", 60)


def test_workers_and_pauses(any_store):
    any_store.worker_seen("gpu0@a")
    any_store.clock.now += 100
    any_store.worker_seen("gpu1@b")
    assert set(any_store.workers()) == {"gpu0@a", "gpu1@b"} and any_store.live_workers(60) == ["gpu1@b"]
    any_store.forget_worker("gpu1@b")
    assert list(any_store.workers()) == ["gpu0@a"]
    any_store.pause_workers(["gpu0@a", "gpu1@b"])
    assert any_store.is_paused("gpu0@a") and any_store.paused_workers() == {"gpu0@a", "gpu1@b"}
    any_store.resume_workers(["gpu0@a"])
    assert any_store.paused_workers() == {"gpu1@b"}
    any_store.resume_workers()
    assert any_store.paused_workers() == set()


def test_a_parked_job_waits_until_its_campaign_is_free_and_it_is_first(any_store):
    a = any_store.create(_job("a"), "sha-a")
    b = any_store.create(_job("b"), "sha-b")
    wait_b = Wait.for_campaign("c1", after="a", now=5.0)
    assert any_store.park("b", wait_b) and any_store.runtime("b").waiting == wait_b
    assert any_store.waiting() == {"b": wait_b} and any_store.waits(["a", "b"]) == {"b": wait_b}
    # The first job of a free campaign may not park: it would miss the wake-up meant for it.
    assert not any_store.park("a", Wait.for_campaign("c1", after=None))
    assert any_store.wake_head("c1") is None  # a is first and not parked: nothing to wake
    any_store.claim(a.id, "w", token="t")
    assert any_store.acquire_campaign_lock("c1", "w:a", 60)
    assert any_store.wake_head("c1") is None  # the campaign is held
    any_store.transition(a.id, JobStatus.COMPLETED, owner="t")
    any_store.release_campaign_lock("c1", "w:a")
    any_store.mark_published([a.id, b.id])
    assert any_store.wake_head("c1") == b.id and any_store.wake_head("c1") is None  # woken once
    assert any_store.runtime(b.id).waiting is None and any_store.waiting() == {}
    assert any_store.unpublished(0) == [b.id]  # until its message is sent


def test_a_backoff_wait_is_due_at_its_time_and_any_status_change_ends_a_wait(any_store):
    any_store.create(_job("a"), "sha-a")
    any_store.create(_job("b", campaign="c2"), "sha-b")
    any_store.mark_published(["a", "b"])
    assert any_store.park("a", Wait.for_backoff("c1", until=any_store.clock.now + 10))
    assert any_store.release_due() == [] and any_store.wake_head("c1") is None  # not before its time
    any_store.clock.now += 10
    assert any_store.release_due() == ["a"] and any_store.release_due() == []
    assert any_store.unpublished(0) == ["a"]
    assert any_store.acquire_campaign_lock("c2", "w:x", 60)
    assert any_store.park("b", Wait.for_campaign("c2", after="x"))  # first of c2, but c2 is held...
    any_store.transition("b", JobStatus.CANCELLED)  # ...then cancelled: no longer waiting
    assert any_store.waiting() == {} and any_store.runtime("b").waiting is None
    assert not any_store.park("b", Wait.for_campaign("c2", after="x"))  # only a queued job waits


def test_dead_letters(any_store):
    any_store.dead_letter(b'"hello"', {"id": "x", "task": "guild.train"}, "ValueError: too many values", "normal")
    any_store.dead_letter(b"\xff\x00binary", {}, "cannot decode", "low")
    assert any_store.dead_letter_count() == 2
    newest, oldest = any_store.dead_letters()
    assert newest.queue == "low" and newest.body.startswith("base64:") and newest.body_bytes == 8
    assert oldest.body == '"hello"' and oldest.headers["task"] == "guild.train" and "too many" in oldest.error


def test_unknown_job(any_store):
    with pytest.raises(UnknownJob, match="nope"):
        any_store.get("nope")


def test_both_stores_have_the_same_interface():
    def public(cls):
        return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
                if not name.startswith("_")}

    redis_api, memory_api = public(JobStore), public(MemoryJobStore)
    assert set(redis_api) == set(memory_api)
    differing = [n for n in redis_api if list(redis_api[n].parameters) != list(memory_api[n].parameters)]
    assert differing == []


# ------------------------------------------------------------------------------------------------ Redis only


def test_a_wrong_key_type_fails_the_enqueue_and_leaves_nothing(store, redis_client):
    """MULTI does not roll back: a queued index turned into a list (a Flower `queue` option) used to leave a queued
    job behind while the enqueue failed with WRONGTYPE (issue 11, break 3)."""
    redis_client.rpush(keys.JOBS_QUEUED, "junk")
    before = sorted(redis_client.keys("*"))
    with pytest.raises(StoreLayoutError, match=r"guild:jobs:queued is a list, not a zset.*nothing was written"):
        store.create(_job(), "sha")
    after = sorted(k for k in redis_client.keys("*") if k != keys.JOB_SEQ.encode())
    assert after == before, "the failed enqueue left keys behind"
    assert store.check_layout() and "guild:jobs:queued is a list" in store.check_layout()[0]


def test_a_wrong_key_type_fails_a_transition_and_changes_nothing(store, redis_client):
    job = store.create(_job(), "sha")
    redis_client.delete(keys.CAMPAIGN_PENDING.format(id="c1"))
    redis_client.set(keys.CAMPAIGN_PENDING.format(id="c1"), "oops")
    with pytest.raises(StoreLayoutError, match="guild:campaign:c1:pending is a string"):
        store.claim(job.id, "w")
    assert store.get(job.id).status is JobStatus.QUEUED and store.get(job.id).attempts == 0
    assert [h["to"] for h in store.history(job.id)] == ["queued"]


def test_check_layout_names_every_wrong_key(store, redis_client):
    store.create(_job(), "sha")
    assert store.check_layout() == []
    redis_client.delete(keys.JOBS_SUMMARY)
    redis_client.lpush(keys.JOBS_SUMMARY, "x")
    redis_client.hset(celery_key("high"), "not", "a list")  # the queue's list, under kombu's prefix
    problems = store.check_layout()
    assert len(problems) == 2
    assert any("guild:jobs:summary is a list, not a hash" in p for p in problems)
    assert any("guild-celery:high is a hash, not a list" in p for p in problems)


def test_move_message_to_head_finds_non_ascii_ids(store, redis_client, redis_server):
    from celery import Celery

    from celeryconfig import broker_transport_options

    app = Celery("t", broker=redis_server.url, set_as_current=False)
    app.conf.broker_transport_options = broker_transport_options  # the guild-celery: key prefix, as workers use
    try:
        for job_id in ("20260101T000000_a", "20260101T000000_数据", "20260101T000000_b"):
            app.send_task("guild.train", args=[job_id], task_id=job_id, queue="low", routing_key="low")
    finally:
        app.close()
    assert store.move_message_to_head("low", "20260101T000000_数据")
    head = json.loads(redis_client.lrange(celery_key("low"), -1, -1)[0])["headers"]["id"]
    assert head == "20260101T000000_数据" and store.message_counts() == {"high": 0, "normal": 0, "low": 3}
    assert not store.move_message_to_head("low", "absent")


def test_server_health_reads_info(store):
    health = store.server_health()
    assert health.aof_enabled and health.eviction_policy == "noeviction" and health.version
