"""engine.gang on the CPU (gloo): two ranks all-reduce; a rank killed, hung or raising ends the whole gang within
its bounds, and no process of the gang (nor one a rank started) outlives it."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.gang import Gang, GangConfig, GangFailed, run_gang
from tests import gang_fixtures

pytestmark = pytest.mark.slow
BOUND_S = 120  # generous: a gang that does not end by then is a hung test, reported as a failure


def bounded(fn, *args, **kwargs):
    """Run ``run_gang`` in a thread so that a gang that never ends fails the test instead of hanging it."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=BOUND_S)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(path: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return int(path.read_text())


def gang_pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(directory.glob("*.pid"))]


def test_two_ranks_all_reduce_and_rank_0_reports_and_returns():
    progress = []
    result = bounded(run_gang, gang_fixtures.all_reduce, args=(3,), config=GangConfig(ranks=2),
                     on_progress=progress.append)
    assert result == {"rank": 0, "world": 2, "device": "cpu", "sums": [3.0, 3.0, 3.0]}
    assert progress == [{"step": 1, "sum": 3.0}, {"step": 2, "sum": 3.0}, {"step": 3, "sum": 3.0}]


def test_kill_9_of_one_rank_ends_the_gang_and_leaves_no_process(tmp_path):
    def kill_rank_1():
        pid = wait_for(tmp_path / "rank1.pid")
        wait_for(tmp_path / "rank0.pid")
        time.sleep(0.3)  # a few all-reduces in
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    with pytest.raises(GangFailed) as info:
        bounded(run_gang, gang_fixtures.train_until_killed, args=(str(tmp_path),),
                config=GangConfig(ranks=2, collective_timeout_s=30, silence_timeout_s=30, grace_s=2))
    killer.join(timeout=5)
    assert str(info.value) == ("rank 1 of 2 was killed by signal 9 (SIGKILL); every rank of the gang was stopped")
    assert info.value.transient
    pids = gang_pids(tmp_path)
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]  # two ranks and rank 1's own child


def test_a_silent_rank_is_caught_by_the_watchdog(tmp_path):
    with pytest.raises(GangFailed) as info:
        bounded(run_gang, gang_fixtures.rank1_hangs, args=(str(tmp_path), False),
                config=GangConfig(ranks=2, collective_timeout_s=60, silence_timeout_s=3, grace_s=1))
    assert str(info.value) == "rank 1 of 2 sent no heartbeat for 3 s (hung); every rank of the gang was stopped"
    pids = gang_pids(tmp_path)
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]


def test_a_collective_waiting_on_a_hung_rank_times_out(tmp_path):
    with pytest.raises(GangFailed) as info:
        bounded(run_gang, gang_fixtures.rank1_hangs, args=(str(tmp_path), True),
                config=GangConfig(ranks=2, collective_timeout_s=3, silence_timeout_s=60, grace_s=1))
    assert info.value.rank == 0 and info.value.reason.startswith("raised ")
    assert "timed out" in info.value.reason.lower() or "timeout" in info.value.reason.lower()
    pids = gang_pids(tmp_path)
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]


def test_an_exception_in_a_rank_fails_the_gang_with_its_traceback():
    with pytest.raises(GangFailed) as info:
        bounded(run_gang, gang_fixtures.rank1_raises, config=GangConfig(ranks=2, grace_s=1))
    assert str(info.value) == ("rank 1 of 2 raised ValueError: bad shard on rank 1; every rank of the gang was "
                               "stopped")
    assert 'raise ValueError("bad shard on rank 1")' in info.value.rank_traceback
    assert isinstance(info.value.error, ValueError) and str(info.value.error) == "bad shard on rank 1"


def test_should_stop_reaches_every_rank():
    reports = []
    result = bounded(run_gang, gang_fixtures.stops_when_asked, config=GangConfig(ranks=2),
                     on_progress=reports.append, should_stop=lambda: len(reports) >= 3)
    assert result >= 3 and reports[:3] == [{"beat": 0}, {"beat": 1}, {"beat": 2}]


def test_a_warm_gang_runs_each_call_in_the_same_processes():
    with Gang(GangConfig(ranks=2)) as gang:
        pids = gang.pids()
        first = bounded(gang.run, gang_fixtures.count_calls)
        # A stop request of one call never reaches the next: the second call beats to its limit.
        stopped = bounded(gang.run, gang_fixtures.beats_until_stopped, (1000,), should_stop=lambda: True)
        second = bounded(gang.run, gang_fixtures.count_calls)
        unstopped = bounded(gang.run, gang_fixtures.beats_until_stopped, (5,))
        assert (first, second) == ({"calls": 1, "pid": pids[0]}, {"calls": 2, "pid": pids[0]})
        assert stopped < 1000 and unstopped == 5
        assert gang.live_ranks() == 2
    assert gang.closed and gang.live_ranks() == 0 and not [pid for pid in pids if alive(pid)]


def test_a_rank_that_died_between_calls_fails_the_next_call_at_once():
    gang = Gang(GangConfig(ranks=2, grace_s=1))
    try:
        bounded(gang.run, gang_fixtures.count_calls)
        pids = gang.pids()
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(GangFailed, match="rank 1 of 2 was killed by signal 9"):
            bounded(gang.run, gang_fixtures.count_calls)
        assert gang.closed and not [pid for pid in pids if alive(pid)]
        with pytest.raises(RuntimeError, match="this gang is closed"):
            gang.run(gang_fixtures.count_calls)
    finally:
        gang.close()
