"""Reliability 1: a worker killed with SIGKILL mid-job loses nothing; the job resumes from its checkpoint.

Recovery is by the sweeper of the next worker (tasks/sweeper.py): with ``GUILD_HEARTBEAT_STALE_S=3`` and
``GUILD_SWEEP_INTERVAL_S=1`` a lost job is back in its queue within seconds, and the job's own checkpoint
(``$GUILD_HOME/campaigns/tiny-qwen3/<campaign>/checkpoints/<job>/step-N``) is where it continues.
"""

from __future__ import annotations

import random
import time

import pytest

from engine.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint_state
from tests.reliability_helpers import SHORT_JOB, enqueue_ids, record_figure, wait_final, write_dataset
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_RECOVERY = {"GUILD_HEARTBEAT_STALE_S": "3", "GUILD_SWEEP_INTERVAL_S": "1"}
KILL_POINTS = 5
SEED = 20261128
MAX_STEPS = 20
RECOVERY_BOUND_S = 30  # kill → the next worker trains the job again; stale (3 s) + sweep (1 s) + startup


def _checkpoints(guild_home, campaign: str, job_id: str):
    return guild_home / "campaigns" / "tiny-qwen3" / campaign / "checkpoints" / job_id


def test_killed_worker_job_resumes_from_its_checkpoint(run_cli, start_worker, store, guild_home, tmp_path):
    rng = random.Random(SEED)
    # A kill point is the step the job must have reached (with at least one complete checkpoint) before SIGKILL.
    kill_steps = [rng.randint(4, MAX_STEPS - 3) for _ in range(KILL_POINTS)]
    dataset = write_dataset(tmp_path / "kill.jsonl", "kill", lines=16)

    worker = start_worker("gpu0@kill-0", env=FAST_RECOVERY)
    [reference_id] = enqueue_ids(run_cli, str(dataset), "--campaign", "kill-ref", *SHORT_JOB)
    [reference] = wait_final(store, [reference_id])
    assert reference.status.value == "completed", (reference.last_error, worker.log()[-3000:])
    assert reference.final_step == MAX_STEPS

    runs = []
    for n, kill_step in enumerate(kill_steps, start=1):
        campaign = f"kill-{n}"
        [job_id] = enqueue_ids(run_cli, str(dataset), "--campaign", campaign, "--force", *SHORT_JOB)
        checkpoint_dir = _checkpoints(guild_home, campaign, job_id)

        def reached(job_id=job_id, kill_step=kill_step, checkpoint_dir=checkpoint_dir):
            progress = store.get(job_id).progress or {}
            return progress.get("step", 0) >= kill_step and latest_checkpoint(checkpoint_dir) is not None

        wait_until(reached, 60, interval_s=0.05, what=f"{job_id} at step {kill_step} with a checkpoint")
        worker.kill()
        killed_at = time.monotonic()
        progress_at_kill = store.get(job_id).progress["step"]
        checkpoint = latest_checkpoint(checkpoint_dir)  # stable now: nothing writes after SIGKILL
        checkpoint_step = read_checkpoint_state(checkpoint)["global_step"]
        assert store.get(job_id).status.value == "processing"

        worker = start_worker(f"gpu0@kill-{n}", env=FAST_RECOVERY)

        def retrained(job_id=job_id):
            job = store.get(job_id)
            return job.attempts == 2 and job.status.value in ("processing", "completed")

        try:
            wait_until(retrained, RECOVERY_BOUND_S, interval_s=0.1, what=f"{job_id} claimed again")
        except TimeoutError:
            pytest.fail(f"kill point {n} (step {kill_step}): {job_id} not trained again {RECOVERY_BOUND_S} s after "
                        f"the kill; history: {store.history(job_id)}; "
                        f"campaign lock: {store.redis.get(f'guild:campaign:{campaign}:lock')}")
        recovery_s = time.monotonic() - killed_at
        [job] = wait_final(store, [job_id], timeout_s=90)
        assert job.status.value == "completed", (job.last_error, worker.log()[-3000:])
        assert job.attempts == 2
        assert job.start_step == checkpoint_step, (job.start_step, checkpoint_step)
        assert job.final_step == reference.final_step
        assert [step for step, _ in list_checkpoints(checkpoint_dir)][-1] == MAX_STEPS
        statuses = [h["to"] for h in store.history(job_id)]
        assert statuses == ["queued", "processing", "queued", "processing", "completed"], statuses
        runs.append({"kill_step": kill_step, "progress_at_kill": progress_at_kill, "resumed_from": checkpoint_step,
                     "recovery_s": round(recovery_s, 1),
                     "loss_delta_vs_reference": round(abs(job.final_loss - reference.final_loss), 6)})

    record_figure("worker-killed", runs=len(runs), passes=len(runs), lost=0,
                  max_recovery_s=max(r["recovery_s"] for r in runs), kill_points=runs)
