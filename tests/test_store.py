import json

import pytest

from jobs.errors import DuplicateDataset, IllegalTransition, UnknownJob
from jobs.job import Job, JobStatus


def _job(job_id="2026-01-01T00:00:00_a.jsonl", priority="normal", campaign="c1"):
    return Job(id=job_id, dataset_path="/d", hero_id="tiny-qwen3", campaign_id=campaign, priority=priority)


def test_create_makes_ids_unique_and_indexes(store):
    a = store.create(_job(), "sha-a")
    b = store.create(_job(), "sha-b")
    assert a.id != b.id and b.id.endswith("-2")
    assert [j.id for j in store.list(status="queued")] == [a.id, b.id]
    assert store.queued_in_order() == [a.id, b.id]


def test_duplicate_content_refused_unless_forced(store):
    first = store.create(_job(), "same")
    with pytest.raises(DuplicateDataset, match=first.id):
        store.create(_job(), "same")
    assert store.create(_job(), "same", force=True).id != first.id


def test_queue_order_is_priority_then_age(store):
    low = store.create(_job("l", "low"), "1")
    normal = store.create(_job("n", "normal"), "2")
    high = store.create(_job("h", "high"), "3")
    assert store.queued_in_order() == [high.id, normal.id, low.id]


def test_claim_is_atomic_and_counts_attempts(store):
    job = store.create(_job(), "x")
    claimed = store.claim(job.id, "w1")
    assert claimed.status is JobStatus.PROCESSING and claimed.attempts == 1 and claimed.started_at
    assert store.claim(job.id, "w2") is None  # a redelivered message never runs it twice at once
    assert store.runtime(job.id)["worker"] == "w1"


def test_claim_takes_over_a_job_whose_worker_died(store):
    job = store.create(_job(), "x")
    store.claim(job.id, "w1")
    store.update(job.id, heartbeat_at=0)
    again = store.claim(job.id, "w2", stale_after_s=1)
    assert again is not None and again.attempts == 2
    reasons = [h["reason"] for h in store.history(job.id)]
    assert any("lost" in r for r in reasons)


def test_transition_checks_state_machine_and_writes_history(store, guild_home):
    job = store.create(_job(), "x")
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobStatus.COMPLETED)
    store.claim(job.id, "w")
    store.transition(job.id, JobStatus.COMPLETED, fields={"final_step": 7}, reason="trained")
    done = store.get(job.id)
    assert done.status is JobStatus.COMPLETED and done.final_step == 7
    assert store.list(status="processing") == [] and store.queued_in_order() == []
    lines = (guild_home / "logs" / "job-history.jsonl").read_text().splitlines()
    assert [json.loads(x)["to"] for x in lines] == ["queued", "processing", "completed"]


def test_unknown_job(store):
    with pytest.raises(UnknownJob, match="nope"):
        store.get("nope")
