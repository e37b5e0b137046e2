"""doctor's disk check: free space against a threshold, with what checkpoints use and what a prune would free; and
every worker paused while work waits."""

from __future__ import annotations

import json

import pytest

from campaigns.disk import format_bytes
from tests.services import REPO, wait_until
from tests.test_retention import FULL, STATE, stage_in_redis


def _disk(run_cli, *args):
    out = run_cli("doctor", "--json", *args, timeout=60)
    return next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "disk")


def test_disk_warns_below_the_threshold_and_names_the_prune(run_cli, store, guild_home):
    stage_in_redis(store, guild_home)
    ok = _disk(run_cli, "--min-free", "1M")
    assert ok["ok"] and "warn below 1.0 MB: --min-free 1M" in ok["detail"]
    low = _disk(run_cli, "--min-free", "100%")
    assert not low["ok"] and low["warning"]  # a warning: it does not make the system unhealthy by itself
    assert f"{format_bytes(12 * FULL + 2 * STATE)} reclaimable" in low["detail"]
    assert "python -m campaigns prune ret" in low["fix"]
    default = _disk(run_cli)
    assert "10% of the disk" in default["detail"] and "3 checkpoints of" in default["detail"]


def test_a_bad_min_free_is_refused(run_cli):
    out = run_cli("doctor", "--min-free", "lots", timeout=60)
    assert out.returncode == 2 and "--min-free 'lots': use a size such as 50G" in out.stderr


def test_the_ranks_of_multi_rank_jobs():
    from types import SimpleNamespace

    import doctor

    jobs = [SimpleNamespace(id="a", progress={"step": 3, "ranks": 4, "ranks_expected": 4}),
            SimpleNamespace(id="b", progress={"step": 9}),  # a one-process worker's job
            SimpleNamespace(id="c", progress=None)]
    check = doctor._rank_check(jobs)
    assert check.ok and check.detail == "1 multi-rank job(s) running: a 4/4"
    jobs.append(SimpleNamespace(id="d", progress={"step": 1, "ranks": 1, "ranks_expected": 2}))
    check = doctor._rank_check(jobs)
    assert not check.ok and check.detail == "2 multi-rank job(s) running: a 4/4; ranks missing: d 1/2"
    assert "GUILD_GANG_TIMEOUT_S" in check.fix


@pytest.mark.integration
@pytest.mark.slow
def test_every_worker_paused_with_work_queued_is_unhealthy(run_cli, start_worker):
    start_worker("gpu0@docpause", env={"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"})
    assert run_cli("jobs", "pause").returncode == 0
    idle = json.loads(run_cli("doctor", "--json", timeout=60).stdout)
    paused = next(c for c in idle["checks"] if c["name"] == "paused")
    assert idle["healthy"] and not paused["ok"] and paused["warning"]  # paused, nothing waiting: a warning
    assert run_cli("enqueue", str(REPO / "examples" / "text.jsonl")).returncode == 0
    out = run_cli("doctor", timeout=60)
    assert out.returncode == 1 and "UNHEALTHY" in out.stdout
    assert ("FAIL paused: every worker is paused (gpu0@docpause) and 1 job(s) are queued: nothing runs them — fix: "
            "python -m jobs resume") in out.stdout
    assert run_cli("jobs", "resume").returncode == 0
    wait_until(lambda: run_cli("doctor", "--json", timeout=60).returncode == 0, 60, interval_s=1,
               what="doctor healthy after the resume")
