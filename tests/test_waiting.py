"""A job waiting for its campaign, on real workers: parked without a message (no broker loop, never a success), it
says what it waits for, and it starts when the job ahead ends, also when that job's worker dies.

The workers train with the stand-in engine (50 ms a step, no torch). Each test prints the time from the end of the
job ahead to the start of the waiting one (a figure, not an assertion: the machine is shared).
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.services import wait_until
from tests.test_pipeline import _enqueue, _wait_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STANDIN = {"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"}


def _file(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps({"prompt": f"which one? {name}", "response": name}) + "\n")
    return str(path)


def _deliveries(workers, job_id: str) -> int:
    return sum(w.log().count(f"guild.train[{job_id}] received") for w in workers)


def _gap_s(before, after) -> float:
    return (datetime.fromisoformat(after.started_at) - datetime.fromisoformat(before.finished_at)).total_seconds()


def test_a_waiting_job_is_parked_says_what_it_waits_for_and_starts_when_the_job_ahead_ends(
        run_cli, start_worker, store, tmp_path):
    # A sweep every 10 minutes: only the end of the job ahead can wake the waiting one within this test.
    env = {**STANDIN, "GUILD_SWEEP_INTERVAL_S": "600"}
    workers = [start_worker(name, wait_ready=False, env=env) for name in ("gpu0@waitA", "gpu1@waitB")]
    for worker in workers:
        worker.wait_ready()
    [ahead] = _enqueue(run_cli, _file(tmp_path, "ahead"), "--campaign", "shared", "--set", "max_steps=120")
    wait_until(lambda: store.get(ahead).status.value == "processing", 60, what="the job ahead to start")
    [behind] = _enqueue(run_cli, _file(tmp_path, "behind"), "--campaign", "shared", "--set", "max_steps=2")
    wait = wait_until(lambda: store.runtime(behind).waiting, 30, interval_s=0.2, what="the job behind to be parked")
    assert wait.after == ahead and wait.campaign == "shared"

    # ---- what it waits for, everywhere an operator looks -------------------------------------------------------
    listed = run_cli("jobs", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(behind))
    assert f"after job {ahead} of campaign shared" in row and " queued " in row
    shown = run_cli("jobs", "show", behind)
    assert f"waiting:           after job {ahead} of campaign shared (since " in shown.stdout
    assert json.loads(run_cli("jobs", "show", behind, "--json").stdout)["waiting"]["after"] == ahead
    from celery.result import AsyncResult

    from tasks.app import app

    assert AsyncResult(behind, app=app).state == "WAITING"  # never SUCCESS while it waits

    # ---- parked: one delivery, no loop through the broker, no "succeeded" ----------------------------------
    wait_until(lambda: store.get(ahead).progress and store.get(ahead).progress["step"] >= 60, 60,
               what="the job ahead to be halfway")
    assert store.get(ahead).status.value == "processing", "the job ahead ended too soon to show anything"
    assert _deliveries(workers, behind) == 1
    assert not any(f"guild.train[{behind}] succeeded" in w.log() for w in workers)

    first, second = _wait_final(store, [ahead, behind], timeout_s=120)
    assert first.status.value == second.status.value == "completed", (first.last_error, second.last_error)
    assert second.start_step == first.final_step == 120 and _gap_s(first, second) >= 0
    assert _deliveries(workers, behind) == 2  # parked once, woken once
    print(f"\nwaiting job started {_gap_s(first, second):.2f} s after the job ahead ended (woken by its end)")


def test_a_job_waiting_behind_a_job_whose_worker_dies_starts_after_the_recovered_job(
        run_cli, start_worker, store, tmp_path):
    env = {**STANDIN, "GUILD_HEARTBEAT_STALE_S": "3", "GUILD_SWEEP_INTERVAL_S": "1"}
    workers = {name: start_worker(name, wait_ready=False, env=env) for name in ("gpu0@dieA", "gpu1@dieB")}
    for worker in workers.values():
        worker.wait_ready()
    [ahead] = _enqueue(run_cli, _file(tmp_path, "ahead"), "--campaign", "c", "--set", "max_steps=200",
                       "--set", "save_steps=20")
    wait_until(lambda: store.get(ahead).status.value == "processing", 60, what="the job ahead to start")
    [behind] = _enqueue(run_cli, _file(tmp_path, "behind"), "--campaign", "c", "--set", "max_steps=2")
    wait_until(lambda: store.runtime(behind).waiting, 30, interval_s=0.2, what="the job behind to be parked")
    wait_until(lambda: (store.get(ahead).progress or {}).get("step", 0) >= 25, 60, what="a checkpoint of the job")
    workers[store.runtime(ahead).worker].kill()

    first, second = _wait_final(store, [ahead, behind], timeout_s=150)
    assert first.status.value == second.status.value == "completed", (first.last_error, second.last_error)
    assert first.attempts == 2 and first.start_step >= 20  # recovered by the sweep, resumed from its checkpoint
    assert second.start_step == first.final_step == 200 and _gap_s(first, second) >= 0
    print(f"\nwaiting job started {_gap_s(first, second):.2f} s after the recovered job ended")
