"""ETAs from what is true now (jobs/queue_plan.py), pinned on the in-memory store with fixed progress and speeds:
the running job's remaining time, campaign order, paused workers, live workers, tokens after truncation, measured
speeds (or "unknown"), retry backoff; then `jobs plan` and `enqueue --plan` on a real Redis."""

from __future__ import annotations

import json

import pytest

from config.settings import Settings
from jobs.job import Job, JobStatus
from jobs.memory_store import MemoryJobStore
from jobs.queue_plan import build_plan
from jobs.speeds import Speed, SpeedSample, device_kind, measured_speed, sample_of
from jobs.waiting import Wait
from tests.services import REPO

NOW = 1_800_000_000.0


class Clock:
    now = NOW

    def __call__(self):
        return self.now


@pytest.fixture
def store(tmp_path):
    clock = Clock()
    memory = MemoryJobStore(tmp_path, clock=clock)
    memory.clock = clock
    return memory


@pytest.fixture
def settings(tmp_path):
    return Settings(guild_home=tmp_path, redis_url="redis://127.0.0.1:1/0", heartbeat_stale_s=60.0)


def _queued(store, job_id, campaign, tokens=5000, priority="normal", estimated=None):
    job = Job(id=job_id, dataset_path="/d", hero_id="tiny-qwen3", campaign_id=campaign, priority=priority,
              estimated_tokens=estimated or tokens, workload={"train_tokens": tokens, "counted": True})
    store.create(job, f"sha-{job_id}")
    return job_id


def _running(store, job_id, campaign, worker, eta_s, updated_ago_s=0.0):
    _queued(store, job_id, campaign)
    store.claim(job_id, worker, token=job_id)
    store.update(job_id, progress={"step": 40, "total_steps": 100, "eta_s": eta_s,
                                   "updated_at": NOW - updated_ago_s})


def _fixed(speeds):
    """speed_of for the plan: {device kind: Speed}."""
    return lambda hero_id, kind: speeds.get(kind, Speed(None))


GPU = Speed(1000.0, 10.0, "measured", 3)  # a 5,000-token job: 15 s


def _plan(store, settings, speeds=None, **kw):
    plan = build_plan(store, settings, now=NOW, speed_of=_fixed(speeds or {"gpu": GPU}), **kw)
    return plan, {j["id"]: j for j in plan["jobs"]}


def test_a_queued_job_starts_after_the_running_jobs_remaining_time(store, settings):
    store.worker_seen("gpu0@a")
    _running(store, "r", "c0", "gpu0@a", eta_s=610.0, updated_ago_s=10.0)  # 600 s left now
    _queued(store, "q", "c1")
    plan, jobs = _plan(store, settings)
    assert plan["running"] == [{"id": "r", "worker": "gpu0@a", "campaign_id": "c0", "step": 40, "total_steps": 100,
                                "remaining_s": 600.0}]
    assert (jobs["q"]["start_s"], jobs["q"]["eta_s"], jobs["q"]["worker"]) == (600.0, 615.0, "gpu0@a")
    assert plan["totals"]["eta_s"] == 615.0 and plan["totals"]["note"] == ""


def test_campaign_order_blocks_a_job_while_another_worker_takes_other_work(store, settings):
    for name in ("gpu0@a", "gpu1@b"):
        store.worker_seen(name)
    _running(store, "r", "c", "gpu0@a", eta_s=100.0)
    _queued(store, "c-next", "c", priority="high")  # first in the queue, but its campaign runs r for 100 s
    _queued(store, "d1", "d")
    _queued(store, "d2", "d")
    plan, jobs = _plan(store, settings)
    assert [j["id"] for j in plan["jobs"]] == ["c-next", "d1", "d2"]
    assert (jobs["c-next"]["start_s"], jobs["c-next"]["eta_s"], jobs["c-next"]["after"]) == (100.0, 115.0, "r")
    assert (jobs["d1"]["start_s"], jobs["d1"]["worker"]) == (0.0, "gpu1@b")
    assert (jobs["d2"]["start_s"], jobs["d2"]["eta_s"], jobs["d2"]["after"]) == (15.0, 30.0, "d1")
    assert plan["totals"]["eta_s"] == 115.0


def test_every_worker_paused_means_no_eta_at_all(store, settings):
    store.worker_seen("gpu0@a")
    store.pause_workers(["gpu0@a"])
    _queued(store, "q", "c")
    plan, jobs = _plan(store, settings)
    assert jobs["q"]["eta_s"] is None and plan["totals"]["eta_s"] is None
    assert plan["totals"]["note"] == "every worker is paused: nothing starts before `python -m jobs resume`"
    store.clock.now += 3600  # the registry is an hour old: no live worker either
    assert _plan(store, settings)[0]["totals"]["note"].startswith("no worker online")


def test_the_number_of_workers_is_the_live_ones(store, settings):
    store.worker_seen("gpu0@gone")
    store.clock.now += 120  # silent for two minutes: not live
    for name in ("gpu1@a", "gpu2@b"):
        store.worker_seen(name)
    for i in range(4):
        _queued(store, f"q{i}", f"c{i}")
    plan, jobs = _plan(store, settings)
    assert plan["workers"]["planned_on"] == ["gpu1@a", "gpu2@b"]
    assert [jobs[f"q{i}"]["eta_s"] for i in range(4)] == [15.0, 15.0, 30.0, 30.0]


def test_tokens_after_truncation_and_unknown_speeds(store, settings):
    store.worker_seen("cpu0@a")
    _queued(store, "oneline", "c", tokens=256, estimated=7_500_000)  # a 30 MB line cut at max_length 256
    plan, jobs = _plan(store, settings, speeds={"cpu": Speed(128.0, 2.0, "measured", 1)})
    assert jobs["oneline"]["train_tokens"] == 256 and jobs["oneline"]["eta_s"] == 4.0
    plan, jobs = _plan(store, settings, speeds={})
    assert jobs["oneline"]["eta_s"] is None and plan["totals"]["eta_s"] is None
    assert "no measured speed" in plan["totals"]["note"]


def test_a_job_in_its_retry_backoff_starts_when_it_ends(store, settings):
    store.worker_seen("gpu0@a")
    _queued(store, "b", "c")
    store.update("b", retry_at=NOW + 42)
    assert store.park("b", Wait.for_backoff("c", until=NOW + 42))  # as its delivery does
    _queued(store, "other", "d")
    plan, jobs = _plan(store, settings)
    assert (jobs["other"]["start_s"], jobs["b"]["start_s"], jobs["b"]["eta_s"]) == (0.0, 42.0, 57.0)


def test_speeds_are_measured_per_hero_and_device_as_a_median(store):
    assert [device_kind(n) for n in ("cpu0@h", "gpu3@h", "gpu0-3@h", "gpu0+2@h", "w@h")] == [
        "cpu", "gpu", "gpu x4", "gpu x2", "unknown"]
    assert sample_of("j", "2026-01-01T00:00:00+00:00", "2026-01-01T00:01:40+00:00", 80_000, 1000.0) == \
        SpeedSample(1000.0, 20.0, 80_000, "j")  # 100 s of wall time, 80 s of them training
    speed = measured_speed([SpeedSample(t, o, 1, "x") for t, o in ((800, 5), (4500, 9), (1200, 7))])
    assert (speed.tokens_per_sec, speed.overhead_s, speed.samples) == (1200, 7, 3)
    for job_id, tps in (("a", 900.0), ("b", 1100.0)):
        _queued(store, job_id, "c")
        store.claim(job_id, "cpu0@h", token=job_id)
        store.transition(job_id, JobStatus.COMPLETED, owner=job_id,
                         fields={"finished_at": "2999-01-01T00:00:00+00:00", "trained_tokens": 9000,
                                 "tokens_per_sec": tps})
    assert [s.tokens_per_sec for s in store.speed_samples("tiny-qwen3", "cpu")] == [1100.0, 900.0]
    assert store.speed_samples("tiny-qwen3", "gpu") == []


def test_the_tiny_hero_has_no_hand_written_speed():
    assert "tokens_per_sec" not in (REPO / "heroes" / "tiny-qwen3.yaml").read_text()


# ------------------------------------------------------------------------------------------- the CLIs


@pytest.fixture
def redis_store(redis_client, guild_env, guild_home):
    from jobs.store import JobStore

    return JobStore(redis_client, guild_home)


def test_jobs_plan_on_redis_plans_on_measured_speeds(run_cli, redis_store):
    from jobs import keys

    store = redis_store
    store.worker_seen("cpu0@plan")
    _queued(store, "j1", "c", tokens=8000)
    store._redis.lpush(keys.SPEEDS.format(hero="tiny-qwen3", kind="cpu"),
                       json.dumps(SpeedSample(2000.0, 3.0, 1, "x").to_dict()))
    out = run_cli("jobs", "plan", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["jobs"][0]["duration_s"] == 7.0 and plan["workers"]["planned_on"] == ["cpu0@plan"]
    assert plan["speeds"][0]["source"] == "measured"
    text = run_cli("jobs", "plan")
    assert "speed    tiny-qwen3 on cpu: 2,000 tok/s + 3.0 s per job (median of 1 job)" in text.stdout
    assert "all done in about 7 s" in text.stdout


def test_enqueue_plan_reports_truncation_and_marks_duplicates(run_cli):
    path = str(REPO / "examples" / "chat_small.jsonl")
    out = run_cli("enqueue", path, "--plan", "--json")
    assert out.returncode == 0, out.stderr
    [new] = json.loads(out.stdout)["jobs"]
    assert new["new"] and new["truncation"].startswith("51 of 240 examples exceed max_length 256 (9,447 tokens cut)")
    assert new["eta_s"] is None  # no worker online
    assert run_cli("enqueue", path).returncode == 0
    again = run_cli("enqueue", path, "--plan")
    assert again.returncode == 0, again.stderr
    assert "DUP  " + path + ": the enqueue would refuse it: same content as job " in again.stdout
    assert "NEW " not in again.stdout
    forced = json.loads(run_cli("enqueue", path, "--plan", "--force", "--json").stdout)
    assert [j["new"] for j in forced["jobs"]] == [False, True] and forced["refused"] == []
