"""Faults in a gang, through a real Celery worker that trains each job on two CPU ranks (``GUILD_RANKS=2``).

``kill -9`` of one rank mid-job: the whole gang is torn down within its bound (no process of it survives), the job
is requeued as a transient failure and completes on its next attempt from its last checkpoint, on a fresh gang.
The worker itself never stops; when it does stop, its warm ranks go with it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint_state
from tests.reliability_helpers import SHORT_SETS, Submitter, record_figure, wait_final, write_dataset
from tests.services import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TWO_CPU_RANKS = {"CUDA_VISIBLE_DEVICES": "", "GUILD_RANKS": "2", "GUILD_GANG_TIMEOUT_S": "60"}
# engine.gang: a dead rank ends its gang within grace_s (5 s) plus a second to name the cause, then SIGKILL and
# reaping; this bound adds a margin for a loaded machine.
GANG_GONE_BOUND_S = 20
# The tiny hero's micro-batch is 4 rows: a global batch of 8 is one micro-batch on each of the two ranks.
GANG_SETS = [*SHORT_SETS, "global_batch_size=8"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def rank_pids(worker_pid: int) -> list[int]:
    """The rank processes under a worker (engine.gang starts each as ``python -c ... _rank_entry ...``)."""
    tree, found, todo = _children(), [], [worker_pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            todo.append(child)
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"engine.gang import _rank_entry" in cmdline:
                found.append(child)
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return any(alive(p) for p in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return members


@pytest.fixture
def submit_jobs(guild_env):
    submitter = Submitter(guild_env["REDIS_URL"])
    yield submitter
    submitter.close()


def test_a_rank_killed_mid_job_fails_the_gang_and_the_job_completes_from_its_checkpoint(
        submit_jobs, start_worker, store, guild_home, tmp_path):
    worker = start_worker("cpu0-1@gang", env=TWO_CPU_RANKS)
    dataset = write_dataset(tmp_path / "gang.jsonl", "gang", lines=16)
    [job_id] = submit_jobs(dataset, campaign="gang", sets=GANG_SETS)
    checkpoints = guild_home / "campaigns" / "tiny-qwen3" / "gang" / "checkpoints" / job_id

    def reached():
        job = store.get(job_id)
        assert job.status.value in ("queued", "processing"), job.last_error
        return (job.progress or {}).get("step", 0) >= 5 and latest_checkpoint(checkpoints) is not None

    wait_until(reached, 180, interval_s=0.05, what=f"{job_id} at step 5 with a checkpoint")
    progress = store.get(job_id).progress
    assert (progress["ranks"], progress["ranks_expected"]) == (2, 2)  # the beat says the gang is whole
    ranks = rank_pids(worker.proc.pid)
    assert len(ranks) == 2, ranks

    # ---- kill -9 one rank ---------------------------------------------------------------------------------------
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    checkpoint_step = read_checkpoint_state(latest_checkpoint(checkpoints))["global_step"]
    wait_until(lambda: not any(group_alive(pid) for pid in ranks), GANG_GONE_BOUND_S, interval_s=0.05,
               what="every process of the killed gang to be gone")
    gang_gone_s = time.monotonic() - killed_at
    wait_until(lambda: store.get(job_id).attempts >= 2 or store.get(job_id).status.value == "queued",
               GANG_GONE_BOUND_S, interval_s=0.05, what=f"{job_id} requeued")
    requeued_s = time.monotonic() - killed_at
    assert worker.proc.poll() is None  # the worker lives on

    # ---- the retry: a fresh gang resumes from the checkpoint -----------------------------------------------------
    [job] = wait_final(store, [job_id], timeout_s=240)
    assert job.status.value == "completed", job.last_error
    assert job.attempts == 2 and job.start_step >= checkpoint_step and job.final_step == 20
    history = store.history(job_id)
    assert [h["to"] for h in history] == ["queued", "processing", "queued", "processing", "completed"]
    assert "was killed by signal 9 (SIGKILL); every rank of the gang was stopped" in history[2]["reason"]
    assert list_checkpoints(checkpoints)[-1][0] == 20
    new_ranks = rank_pids(worker.proc.pid)
    assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks)  # warm for the campaign's next job

    # ---- a worker that stops takes its warm ranks with it ----------------------------------------------------------
    worker.stop()
    wait_until(lambda: not any(alive(pid) for pid in new_ranks), 30, what="the warm ranks to go with their worker")
    record_figure("gang-rank-killed", ranks=2, killed_at_step=progress["step"], resumed_from=job.start_step,
                  gang_gone_s=round(gang_gone_s, 2), requeued_s=round(requeued_s, 2))
