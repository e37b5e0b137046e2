"""jobs.watch_cli: the job's own figures on the bar, a queued job's place, Ctrl-C leaves the job running,
``enqueue --wait --json`` keeps stdout for the final records."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading

import pytest

from jobs.job import Job, JobStatus
from jobs.waiting import Wait
from jobs.watch_cli import watch_jobs
from tests.services import REPO, stop_pid, wait_until

EXAMPLES = REPO / "examples"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _job(store, i, priority="normal"):
    return store.create(Job(id=f"w{i}", dataset_path="/d", hero_id="tiny-qwen3", campaign_id="c", priority=priority),
                        f"sha{i}")


def _finish_later(store, job_id, after_s=1.5):
    def finish():
        import time

        time.sleep(after_s)
        store.transition(job_id, JobStatus.COMPLETED, fields={"final_step": 130, "final_loss": 4.0, "progress": None})

    threading.Thread(target=finish, daemon=True).start()


def test_the_bar_shows_the_jobs_own_step_rate_and_eta(store):
    """A job resumed at step 100 of 130 (now at 112): 40% of this job, the worker's tok/s and ETA."""
    _job(store, 1)
    store.transition("w1", JobStatus.PROCESSING, fields={"start_step": 100})
    store.update("w1", progress={"step": 112, "total_steps": 130, "loss": 4.2031, "lr": 1e-3, "tokens_per_sec": 3100.4,
                           "eta_s": 95.0})
    _finish_later(store, "w1")
    out = Terminal()
    assert watch_jobs(store, ["w1"], poll_s=0.1, stream=out) == 0
    text = out.getvalue()
    assert "40%" in text and "step 112/130 · loss 4.2031 · 3,100 tok/s · ETA 1 min 35 s" in text
    assert "it/s" not in text and "s/step" not in text and "step/s" not in text  # no rate of the bar's own
    assert "status:" in text and "completed" in text


def test_a_queued_job_shows_its_place_in_the_queue(store):
    for i, prio in enumerate(["high", "normal", "normal"]):
        _job(store, i, prio)
    out = io.StringIO()
    assert watch_jobs(store, ["w2"], poll_s=0.1, timeout_s=0.5, stream=out) == 1
    assert "w2: queued (3 of 3 in the queue)" in out.getvalue()
    assert "still queued after 0 s; stopped watching (the job goes on: python -m jobs watch w2)" in out.getvalue()


def test_a_parked_job_says_what_it_waits_for(store):
    for i in range(2):
        _job(store, i, "normal")
    assert store.park("w1", Wait.for_campaign("c", after="w0"))
    out = io.StringIO()
    watch_jobs(store, ["w1"], poll_s=0.1, timeout_s=0.3, stream=out)
    assert "w1: queued — after job w0 of campaign c (2 of 2 in the queue)" in out.getvalue()


def test_json_mode_prints_only_the_final_records_on_stdout(store, capsys):
    _job(store, 1)
    store.transition("w1", JobStatus.PROCESSING)
    _finish_later(store, "w1", after_s=0.5)
    assert watch_jobs(store, ["w1"], poll_s=0.1, as_json=True) == 0
    captured = capsys.readouterr()
    [record] = json.loads(captured.out)
    assert record["id"] == "w1" and record["status"] == "completed"
    assert "w1: processing" in captured.err


@pytest.mark.parametrize("command", [["jobs", "watch", "{id}"], ["enqueue", "{file}", "--wait"]])
def test_ctrl_c_stops_watching_not_the_job(command, run_cli, guild_env, store, tmp_path):
    """No worker runs, so the job stays queued; Ctrl-C ends the watch with the way to follow or cancel it."""
    if command[0] == "jobs":
        [job_id] = [j["id"] for j in json.loads(run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--json").stdout)]
    args = [a.format(id=job_id if command[0] == "jobs" else "", file=EXAMPLES / "text.jsonl") for a in command]
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=guild_env, stdout=o, stderr=e,
                                start_new_session=True)
    try:
        wait_until(lambda: ": queued" in out.read_text(), 60, what="the watch to show the queued job")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        stop_pid(proc)
    [job] = store.list()
    assert proc.returncode == 130
    text = err.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert f"stopped watching; job {job.id} is still queued" in text
    assert f"python -m jobs watch {job.id}" in text and f"python -m jobs cancel {job.id}" in text
    assert store.get(job.id).status is JobStatus.QUEUED


@pytest.mark.integration
@pytest.mark.slow
def test_enqueue_wait_json_stdout_is_only_the_final_records(run_cli, start_worker):
    start_worker()
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--wait", "--json", "--set", "max_steps=2",
                  "--set", "eval_fraction=0", "--set", "max_length=64", timeout=180)
    assert out.returncode == 0, out.stderr
    [record] = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert record["status"] == "completed" and record["final_step"] == 2
    assert f"{record['id']}: completed" in out.stderr
