"""The fleet benchmark (bench/fleet.py): its checks catch what they claim to, and a small fleet passes them.

The checks are tested on made-up timelines first (a checker that never fails proves nothing); then the benchmark
runs at a small scale with real processes, so a regression in the queue's guarantees (strict priority, one worker
per campaign, every job ending exactly once) fails ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import fleet_analysis as fa
from tests.services import REPO


def _job(job_id, priority, campaign, seq, transitions, attempts=1):
    rank = {"high": 0, "normal": 1, "low": 2}[priority]
    return fa.JobFacts(job_id, priority, rank, campaign, seq, transitions[-1].target, attempts, transitions)


def _t(at, source, target, worker=None, reason=""):
    return fa.Transition(at, source, target, worker, reason)


def _ran(job_id, priority, campaign, seq, queued, claimed, ended, worker):
    return _job(job_id, priority, campaign, seq, [_t(queued, None, "queued"),
                                                  _t(claimed, "queued", "processing", worker),
                                                  _t(ended, "processing", "completed", worker)])


def _log(worker, ready, deliveries):
    return fa.WorkerLog(worker, 0, ready, [fa.Task(worker, 0, job, received, done, action)
                                           for job, received, done, action in deliveries])


# ------------------------------------------------------------------------------------------- strict priority


def test_a_low_job_taken_while_a_high_one_waits_is_a_violation():
    # h (high) is eligible from t=10 but taken only at t=20; w1 takes low job l at t=13: a violation (waited 3 s).
    # l2 is taken at t=10.5, while h's message may still have been in flight: only the raw count sees it.
    jobs = {j.id: j for j in [_ran("h", "high", "c1", 1, 10, 20.01, 21, "w2"),
                              _ran("l", "low", "c2", 2, 0, 13.01, 14, "w1"),
                              _ran("l2", "low", "c3", 3, 0, 10.51, 11, "w3")]}
    logs = [_log("w1", 0, [("l", 13, 14, "completed")]), _log("w2", 0, [("h", 20, 21, "completed")]),
            _log("w3", 0, [("l2", 10.5, 11, "completed")])]
    eps = fa.episodes(jobs, logs)
    strict = fa.priority_violations(eps, tolerance_s=1.5)
    assert (strict["count"], strict["examples"][0]["claimed"], strict["examples"][0]["waited_s"]) == (1, "l", 3.0)
    assert fa.priority_violations(eps, tolerance_s=0.0)["count"] == 2
    # After a fault the sweep needs its stale window to send lost messages again: counted apart.
    recovering = fa.priority_violations(eps, tolerance_s=1.5, recovery=[(12.0, 27.0)])
    assert (recovering["count"], recovering["during_recovery"]) == (0, 1)


def test_a_high_job_whose_campaign_is_busy_does_not_hold_back_low_ones():
    # h is queued from t=0 but its campaign runs r until t=30: it is not eligible, so low job l may go at t=5.
    jobs = {j.id: j for j in [_ran("r", "normal", "c1", 1, 0, 0.5, 30, "w1"),
                              _ran("h", "high", "c1", 2, 0, 30.2, 31, "w1"),
                              _ran("l", "low", "c2", 3, 0, 5.01, 6, "w2")]}
    logs = [_log("w1", 0, [("r", 0.4, 30.1, "completed"), ("h", 30.15, 31, "completed")]),
            _log("w2", 0, [("l", 5, 6, "completed")])]
    eps = fa.episodes(jobs, logs)
    assert {e.job: e.eligible_at for e in eps}["h"] == 30
    assert fa.priority_violations(eps, tolerance_s=0.0)["count"] == 0


def test_dispatch_latency_counts_from_a_free_worker_and_an_eligible_job():
    # w1 ends r at t=10 (free) and wastes 2 s deferring another message before it claims a (eligible since t=5).
    jobs = {j.id: j for j in [_ran("r", "normal", "c1", 1, 0, 1, 9.9, "w1"),
                              _ran("a", "normal", "c2", 2, 5, 12.02, 13, "w1")]}
    logs = [_log("w1", 0, [("r", 0.99, 10, "completed"), ("x", 10.01, 12.0, "deferred"),
                           ("a", 12.01, 13, "completed")])]
    latency = fa.dispatch_latencies(fa.episodes(jobs, logs))
    assert latency["dispatch_s"]["max"] == pytest.approx(2.02, abs=1e-3)  # from t=10 (w1 free) to the claim
    assert latency["pickup_s"]["max"] == pytest.approx(0.01, abs=1e-3)


# -------------------------------------------------------------------------------- one campaign, exactly once


def test_two_runs_of_one_campaign_at_once_are_an_overlap():
    spans = {"c1": [(0, 10, "a"), (9, 12, "b"), (12, 13, "c")], "c2": [(0, 20, "d")]}
    found = fa.overlaps(spans)
    assert (found["count"], found["seconds"], found["examples"][0]["b"]) == (1, 1.0, "b")
    assert fa.overlaps({"c1": [(0, 10, "a"), (10, 12, "b")]})["count"] == 0


def test_a_killed_run_lasts_until_its_worker_was_killed():
    jobs = {"a": _ran("a", "normal", "c1", 1, 0, 1, 20, "w1"), "b": _ran("b", "normal", "c1", 2, 0, 6, 8, "w2")}
    runs = [fa.Run("a", pid=11, ppid=10, start=1), fa.Run("b", pid=21, ppid=20, start=6, end=8)]
    assert fa.overlaps(fa.engine_intervals(runs, jobs, {10: 5.0}, horizon=100))["count"] == 0
    assert fa.overlaps(fa.engine_intervals(runs, jobs, {}, horizon=100))["count"] == 1  # never killed: still running


def test_lost_duplicated_and_twice_trained_jobs_are_reported():
    done = _ran("a", "normal", "c1", 1, 0, 1, 2, "w1")
    twice = _job("b", "normal", "c1", 2, [_t(0, None, "queued"), _t(3, "queued", "processing", "w1"),
                                          _t(4, "processing", "completed"), _t(5, "processing", "completed")])
    stuck = _job("c", "normal", "c1", 3, [_t(0, None, "queued")])
    runs = [fa.Run("a", 1, 1, 1, 2, "completed", 0, 5, 5), fa.Run("b", 1, 1, 3, 4, "completed", 5, 10, 10),
            fa.Run("b", 2, 2, 4, 5, "completed", 5, 10, 10)]
    campaigns = {"c1": {"current_step": 15, "job_ids": ["a", "b", "c"]}}
    found = fa.endings({j.id: j for j in (done, twice, stuck)}, ["a", "b", "c", "d"], runs, campaigns, steps=5)
    assert not found["ok"]
    assert (found["lost"], found["completed_twice"], found["trained_to_the_end_twice"]) == (["c", "d"], ["b"], ["b"])
    assert found["never_ran"] == ["c", "d"] and found["campaign_problems"] == []
    clean = fa.endings({"a": done}, ["a"], runs[:1], {"c1": {"current_step": 5, "job_ids": ["a"]}}, steps=5)
    assert clean["ok"] and clean["attempts"] == {"1": 1}


def test_worker_logs_are_read_with_their_times_and_outcomes():
    text = (
        "[2026-11-29 14:11:47,790: INFO/MainProcess] gpu0@spike ready.\n"
        "[2026-11-29 14:11:48,316: INFO/MainProcess] Task guild.train[20261129T141148_d1] received\n"
        "[2026-11-29 14:11:49,375: INFO/ForkPoolWorker-1] Task guild.train[20261129T141148_d1] succeeded in 1.04s: "
        "{'job_id': '20261129T141148_d1', 'action': 'deferred', 'detail': 'an earlier job goes first'}\n"
        "Traceback (most recent call last):\n"
        "[2026-11-29 14:11:49,382: INFO/MainProcess] Task guild.train[20261129T141148_d3] received\n"
        "[2026-11-29 14:11:49,482: WARNING/ForkPoolWorker-1] Task guild.train[20261129T141148_d3] reject "
        "requeue=True: Error 111 connecting to 127.0.0.1:35167. Connection refused.\n"
        "[2026-11-29 14:11:50,000: INFO/MainProcess] Task guild.train[20261129T141148_d4] received\n"
        "[2026-11-29 14:11:51,000: INFO/MainProcess] Task guild.train[20261129T141148_d5] received\n"
    )
    log = fa.parse_worker_log(text, "gpu0@spike", 0)
    assert [(t.job[-2:], t.action) for t in log.tasks] == [("d1", "deferred"), ("d3", "rejected"),
                                                           ("d4", "unlogged"), ("d5", None)]
    assert round(log.tasks[0].done - log.tasks[0].received, 3) == 1.059
    assert round(log.tasks[0].received - log.ready, 3) == 0.526


# ------------------------------------------------------------------------------------------ a real small fleet


@pytest.mark.slow
@pytest.mark.integration
def test_a_small_fleet_keeps_the_queues_guarantees(tmp_path):
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, "bench/fleet.py", "--workers", "4", "--jobs", "40", "--campaigns", "10", "--max-batch", "2",
         "--steps", "5", "--step-s", "0.02", "--preload", "0.3", "--feed-s", "5", "--idle-s", "0", "--steady-s", "0",
         "--capacity-s", "0", "--timeout-s", "150", "--json", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    print(proc.stdout)
    endings = report["endings"]
    assert (endings["completed"], endings["lost"], endings["completed_twice"], endings["unknown"]) == (40, [], [], [])
    assert endings["trained_to_the_end_twice"] == [] and endings["campaign_problems"] == []
    assert endings["attempts"] == {"1": 40} and endings["runs_per_job"] == {"1": 40}
    assert report["campaign_overlap"]["engine"]["count"] == 0 and report["campaign_overlap"]["store"]["count"] == 0
    assert report["priority"]["beyond_tolerance"]["count"] == 0
    assert report["latency"]["claims"] == 40
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not (tmp_path / "work").exists()  # every process stopped and the work folder removed
