"""Reliability 9: a CUDA device-side assert fails its job and replaces the worker process; the next job trains.

After a device-side assert (or an illegal memory access) every later CUDA call of that process fails, so retrying in
it, or training the next job in it, would fail too. The retry policy calls such an error "poisoned": the job fails
(no retry), and the task leaves its pool process, which Celery replaces with a fresh one. The worker trains with a
stand-in engine (``GUILD_ENGINE_FACTORY``) that raises the CUDA error on a dataset containing POISON.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.reliability_helpers import enqueue_ids, record_figure, wait_final
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_device_side_assert_replaces_the_worker_process(run_cli, start_worker, store, tmp_path):
    worker = start_worker("gpu0@poison", env={"GUILD_ENGINE_FACTORY": "tests.standin_engines:poisoning"})
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text(json.dumps({"text": "POISON pill"}) + "\n")
    good.write_text(json.dumps({"text": "a healthy line"}) + "\n")
    sets = ["--set", "max_steps=5", "--campaign", "poison"]
    [bad_id] = enqueue_ids(run_cli, str(bad), *sets)
    [good_id] = enqueue_ids(run_cli, str(good), *sets)

    failed, completed = wait_final(store, [bad_id, good_id], timeout_s=120)
    assert failed.status.value == "failed" and failed.attempts == 1, failed.last_error
    assert "device-side assert" in failed.last_error and "process is replaced" in failed.last_error
    assert completed.status.value == "completed", (completed.last_error, worker.log()[-3000:])

    log = worker.log()
    assert "replacing this worker process" in log
    poisoned_in = re.search(rf"\[[^]]*/(ForkPoolWorker-\d+)\] job {bad_id}: processing → failed", log).group(1)
    trained_in = re.search(rf"\[[^]]*/(ForkPoolWorker-\d+)\] job {good_id}: queued → processing", log).group(1)
    assert trained_in != poisoned_in, "the next job ran in the poisoned process"
    # The poisoned job's message came back once (Celery counts the exit as a lost worker) and was dropped.
    wait_until(lambda: f"job {bad_id}: dropped job is failed" in worker.log(), 30, what="the copy dropped")
    assert [h["to"] for h in store.history(bad_id)] == ["queued", "processing", "failed"]
    assert worker.proc.poll() is None
    record_figure("cuda-poisoned", runs=1, passes=1, lost=0, poisoned_process=poisoned_in, next_process=trained_in,
                  retries_of_poisoned_job=0)
