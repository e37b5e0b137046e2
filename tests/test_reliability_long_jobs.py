"""Reliability 2: a job longer than the broker's visibility timeout runs exactly once.

Kombu's Redis transport gives an unacked message back to its queue once it is older than ``visibility_timeout``:
a consumer's poller does that sweep when it starts (then every ~100 s). Guild keeps the timeout long, but a job
may still outlive it; then a second worker receives the message of a job that is still running. The campaign
lock and the atomic claim (tasks/lifecycle.py, jobs/store.py) must make that delivery harmless.

The second worker is started once the running job's message is older than the timeout, so its start-up sweep
certainly hands it the message: the test checks that the hazard happened, not only that nothing went wrong.
"""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.reliability_helpers import (
    enqueue_ids,
    queued_task_ids,
    record_figure,
    unacked_task_ids,
    wait_final,
    write_dataset,
)
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VISIBILITY_TIMEOUT_S = 3
SHORT_TIMEOUT = {"GUILD_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)}
LONG_JOB = ["--set", "max_steps=40", "--set", "save_steps=10", "--set", "max_length=128", "--set", "eval_fraction=0"]


def test_job_longer_than_visibility_timeout_runs_once(run_cli, start_worker, store, redis_client, tmp_path):
    first = start_worker("gpu0@long-a", env=SHORT_TIMEOUT)
    dataset = write_dataset(tmp_path / "long.jsonl", "long", lines=16)
    [job_id] = enqueue_ids(run_cli, str(dataset), *LONG_JOB, extra_env=SHORT_TIMEOUT)

    # ---- the message of the running job outlives the visibility timeout; then a second worker comes up ----------
    wait_until(lambda: store.get(job_id).status.value == "processing", 60, what=f"{job_id} running")
    claimed_at = time.monotonic()
    wait_until(lambda: time.monotonic() - claimed_at > VISIBILITY_TIMEOUT_S + 1, VISIBILITY_TIMEOUT_S + 2)
    second = start_worker("gpu1@long-b", env=SHORT_TIMEOUT)
    assert store.get(job_id).status.value == "processing", "the job ended before the second worker came up"

    [job] = wait_final(store, [job_id], timeout_s=120)
    assert job.status.value == "completed", (job.last_error, first.log()[-3000:])

    # ---- exactly once ------------------------------------------------------------------------------------------
    ran_s = (datetime.fromisoformat(job.finished_at) - datetime.fromisoformat(job.started_at)).total_seconds()
    assert ran_s >= 3 * VISIBILITY_TIMEOUT_S, f"the job ran {ran_s:.1f} s: too short to test anything"
    history = store.history(job_id)
    claims = [h for h in history if h["to"] == "processing"]
    assert [h["to"] for h in history] == ["queued", "processing", "completed"], history
    assert job.attempts == 1 and claims[0]["worker"] == first.name
    assert job.start_step == 0 and job.final_step == 40

    # The last copy of the message is dropped (the job is completed) and none is left, queued or held.
    def settled():
        return "'action': 'dropped'" in first.log() + second.log() and job_id not in queued_task_ids(redis_client) \
            and job_id not in unacked_task_ids(redis_client)

    wait_until(settled, 30, interval_s=0.2, what="the last copy of the message to be dropped")
    # The second worker did receive the message (the hazard), and only ever put it back or dropped it.
    log = second.log()
    deliveries = log.count(f"guild.train[{job_id}] received")
    assert deliveries >= 1, "the visibility timeout never handed the running job to the second worker"
    assert f"claimed by {second.name}" not in log and "run " + job_id not in log
    record_figure("long-job", runs=1, passes=1, lost=0, job_s=round(ran_s, 1),
                  visibility_timeout_s=VISIBILITY_TIMEOUT_S, ratio=round(ran_s / VISIBILITY_TIMEOUT_S, 1),
                  claims=len(claims), attempts=job.attempts, deliveries_to_second_worker=deliveries,
                  trained_by_second_worker=0)
