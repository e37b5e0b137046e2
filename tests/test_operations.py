"""Operating Guild: plan, cancel, retry, pause/resume, preemption, watch and doctor, against real processes."""

import json
import subprocess
import sys

import pytest

from jobs.job import Job
from jobs.queues import celery_key
from tests.services import REPO, wait_until
from tests.test_pipeline import _enqueue, _wait_final

EXAMPLES = REPO / "examples"
LONG = ["--set", "max_steps=400", "--set", "save_steps=5", "--set", "max_length=128", "--set", "eval_fraction=0"]


def _job(i, priority, tokens=1000):
    return Job(id=f"j{i}", dataset_path="/x", hero_id="tiny-qwen3", campaign_id="c", priority=priority,
               num_examples=10, estimated_tokens=tokens)


def _running_step(store, job_id, at_least=1, timeout_s=120):
    def step():
        job = store.get(job_id)
        return job.progress and job.progress.get("step", 0) >= at_least and job

    return wait_until(step, timeout_s, what=f"{job_id} to reach step {at_least}")


def test_plan_orders_by_priority_then_age_and_guesses_no_eta_without_workers(store, run_cli):
    for i, prio in enumerate(["low", "normal", "high", "normal"]):
        store.create(_job(i, prio, tokens=8000), f"sha{i}")
    out = run_cli("jobs", "plan", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [j["id"] for j in plan["jobs"]] == ["j2", "j1", "j3", "j0"]
    # No worker online: no ETA rather than a guess (tests/test_queue_plan.py pins the ETAs themselves).
    assert [j["eta_s"] for j in plan["jobs"]] == [None] * 4
    assert plan["totals"] == {"jobs": 4, "num_examples": 40, "train_tokens": 32000, "eta_s": None,
                              "note": "no worker online: nothing starts before one does (make worker GPU=N)"}


def test_enqueue_plan_shows_where_files_land_and_enqueues_nothing(store, run_cli, redis_client):
    store.create(_job(1, "low"), "a")
    store.create(_job(2, "high"), "b")
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--priority", "normal", "--plan", "--json")
    assert out.returncode == 0, out.stderr
    ids = [j["id"] for j in json.loads(out.stdout)["jobs"]]
    assert ids[0] == "j2" and ids[1].startswith("(new)") and ids[2] == "j1"
    assert len(store.list()) == 2 and redis_client.llen(celery_key("normal")) == 0


def test_cancel_queued_job(run_cli, store):
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"))
    out = run_cli("jobs", "cancel", job_id)
    assert out.returncode == 0 and "cancelled" in out.stdout
    assert store.get(job_id).status.value == "cancelled"
    again = run_cli("jobs", "cancel", job_id)
    assert again.returncode == 2 and "cancelled" in again.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_cancel_running_then_retry_resumes_from_checkpoint(run_cli, start_worker, store):
    start_worker()
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "chat_small.jsonl"), *LONG)
    _running_step(store, job_id, at_least=7)
    assert run_cli("jobs", "cancel", job_id).returncode == 0
    [job] = _wait_final(store, [job_id])
    assert job.status.value == "cancelled" and job.final_step >= 7  # checkpointed at the stop, never "completed"
    stopped_at = job.final_step
    retried = run_cli("jobs", "retry", job_id)
    assert retried.returncode == 0, retried.stderr
    _running_step(store, job_id, at_least=stopped_at + 1)
    resumed = store.get(job_id)
    assert resumed.start_step == stopped_at and resumed.attempts == 2
    run_cli("jobs", "cancel", job_id)
    _wait_final(store, [job_id])


@pytest.mark.integration
@pytest.mark.slow
def test_pause_requeues_at_head_and_resume_continues(run_cli, start_worker, store):
    start_worker("gpu0@pausehost")
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "chat_small.jsonl"), "--priority", "low", *LONG)
    _running_step(store, job_id, at_least=3)
    out = run_cli("jobs", "pause", "--worker", "gpu0@pausehost")
    assert out.returncode == 0, out.stderr
    job = wait_until(lambda: (j := store.get(job_id)).status.value == "queued" and j, 60, what="requeue on pause")
    assert job.attempts == 0 and job.final_step >= 3  # pausing is not a failed attempt
    paused_at = job.final_step
    assert run_cli("jobs", "resume", "--worker", "gpu0@pausehost").returncode == 0
    _running_step(store, job_id, at_least=paused_at + 1)
    assert store.get(job_id).start_step == paused_at
    run_cli("jobs", "cancel", job_id)
    _wait_final(store, [job_id])


@pytest.mark.integration
@pytest.mark.slow
def test_preempt_low_job_for_high(run_cli, start_worker, store, tmp_path):
    start_worker("gpu0@preempt", env={"GUILD_SWEEP_INTERVAL_S": "1"})
    [low] = _enqueue(run_cli, str(EXAMPLES / "chat_small.jsonl"), "--priority", "low", "--campaign", "lowc", *LONG)
    _running_step(store, low, at_least=3)
    wait_until(lambda: store.workers(), 10, what="worker registry")
    [high] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"), "--priority", "high", "--preempt", "--campaign", "hic",
                      "--set", "max_steps=3", "--set", "eval_fraction=0")
    [high_job] = _wait_final(store, [high])
    assert high_job.status.value == "completed"
    low_job = store.get(low)
    assert low_job.attempts == 1  # preemption does not count as an attempt
    reasons = [h["reason"] for h in store.history(low)]
    assert any("preempt" in r for r in reasons), reasons
    _running_step(store, low, at_least=(low_job.final_step or 0) + 1)
    assert store.get(low).start_step >= 3
    run_cli("jobs", "cancel", low)
    _wait_final(store, [low])


@pytest.mark.integration
@pytest.mark.slow
def test_watch_prints_progress_and_final_status(run_cli, start_worker, store, guild_env):
    start_worker()
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "messages.jsonl"), "--set", "max_steps=6", "--set", "max_length=128")
    out = subprocess.run([sys.executable, "-m", "jobs", "watch", job_id, "--timeout", "120"], cwd=REPO,
                         env=guild_env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "status:" in out.stdout and "completed" in out.stdout and "final_loss" in out.stdout


@pytest.mark.integration
def test_doctor_unhealthy_without_workers_then_healthy(run_cli, start_worker):
    out = run_cli("doctor", "--json", timeout=60)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["healthy"]
    failing = {c["name"] for c in report["checks"] if not c["ok"] and not c["warning"]}
    assert failing == {"workers"}
    assert "make worker" in next(c["fix"] for c in report["checks"] if c["name"] == "workers")
    start_worker("gpu3@doc")
    out = run_cli("doctor", "--json", timeout=60)
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout
    assert any(c["name"] == "worker gpu3@doc" and "high,normal,low" in c["detail"] for c in report["checks"])
    text = run_cli("doctor", "--min-depth", "1", timeout=60)
    assert text.returncode == 1 and "queue-depth" in text.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_a_paused_worker_restarted_stays_paused_until_resume(run_cli, start_worker, store):
    worker = start_worker("gpu0@restart")
    assert run_cli("jobs", "pause", "--worker", "gpu0@restart").returncode == 0
    worker.stop()
    start_worker("gpu0@restart")
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"), "--set", "max_steps=2", "--set", "eval_fraction=0")
    import time

    time.sleep(4)
    assert store.get(job_id).status.value == "queued"
    assert run_cli("jobs", "resume", "--worker", "gpu0@restart").returncode == 0
    [job] = _wait_final(store, [job_id], timeout_s=120)
    assert job.status.value == "completed"
