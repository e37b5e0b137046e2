"""Strict priority survives ``jobs pause`` + ``jobs resume``: every worker consumes high, normal, low in that order.

The cause of the bug this guards against: Celery runs remote-control commands through ``hub.call_soon``, whose
pending callbacks are a *set*, so three ``add_consumer`` commands read in one loop turn ran in any order, and kombu's
Redis transport polls the queues in the order they were added (``queue_order_strategy=priority``). See
tasks/queue_order.py.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tasks.queue_order import StrictPriorityCycle
from tests.services import REPO, wait_until
from tests.test_pipeline import _enqueue, _wait_final

STANDIN = {"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"}  # 50 ms a step, no torch


def test_the_cycle_polls_high_then_normal_then_low_whatever_the_order_queues_are_added():
    cycle = StrictPriorityCycle()
    cycle.update(["normal", "low", "high"])
    assert cycle.consume(3) == ["high", "normal", "low"]
    cycle.rotate("high")  # a message from high never sends high to the back
    assert cycle.consume(3) == ["high", "normal", "low"]
    cycle.update(["low", "other", "normal"])  # a queue Guild does not know comes after its own
    assert cycle.consume(3) == ["normal", "low", "other"]


def _active_queues(names: list[str]) -> dict[str, list[str]]:
    from tasks.app import app

    replies = app.control.inspect(destination=names, timeout=3).active_queues() or {}
    return {name: [q["name"] for q in queues] for name, queues in replies.items()}


@pytest.mark.integration
@pytest.mark.slow
def test_after_pause_and_resume_every_worker_consumes_high_normal_low_in_order(run_cli, start_worker, store,
                                                                              tmp_path):
    names = ["gpu0@order", "gpu1@order"]
    for worker in [start_worker(name, wait_ready=False, env=STANDIN) for name in names]:
        worker.wait_ready()
    want = {name: ["high", "normal", "low"] for name in names}
    assert _active_queues(names) == want
    for _ in range(3):  # the order after a resume used to be a matter of chance: try it a few times
        assert run_cli("jobs", "pause").returncode == 0
        wait_until(lambda: _active_queues(names) == {n: [] for n in names}, 30, interval_s=0.3, what="paused")
        assert run_cli("jobs", "resume").returncode == 0
        wait_until(lambda: all(len(q) == 3 for q in _active_queues(names).values()), 30, interval_s=0.3,
                   what="resumed")
        assert _active_queues(names) == want
    assert run_cli("jobs", "pause", "--worker", names[1]).returncode == 0  # one worker, so the order is visible

    # ---- a busy worker then takes a high job before a normal one enqueued earlier -----------------------------
    def job_file(name: str) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"prompt": f"which goes first? {name}", "response": name}) + "\n")
        return str(path)

    [busy] = _enqueue(run_cli, job_file("busy"), "--priority", "low", "--campaign", "busy", "--set", "max_steps=80")
    wait_until(lambda: store.get(busy).status.value == "processing", 60, what="the busy job to start")
    [normal] = _enqueue(run_cli, job_file("normal"), "--priority", "normal", "--campaign", "n", "--set", "max_steps=2")
    [high] = _enqueue(run_cli, job_file("high"), "--priority", "high", "--campaign", "h", "--set", "max_steps=2")
    assert store.get(busy).status.value == "processing", "the busy job ended before both were enqueued"
    jobs = {j.id: j for j in _wait_final(store, [busy, normal, high], timeout_s=120)}
    assert all(j.status.value == "completed" for j in jobs.values()), {j.id: j.last_error for j in jobs.values()}
    started = sorted(jobs, key=lambda i: datetime.fromisoformat(jobs[i].started_at))
    assert started == [busy, high, normal]
    assert {store.runtime(i).worker for i in jobs} == {names[0]}


def test_resume_is_one_command_that_restores_the_whole_order():
    """``jobs resume`` sends one ``guild_consume_in_order`` broadcast (run as one callback on the worker), never
    three ``add_consumer`` ones whose order the worker does not keep."""
    from jobs.control import resume_workers
    from jobs.memory_store import MemoryJobStore

    class Control:
        def __init__(self):
            self.calls = []

        def broadcast(self, command, **kwargs):
            self.calls.append((command, kwargs))

    control = Control()
    resume_workers(control, MemoryJobStore(REPO / "var-unused"), "gpu0@x")
    assert control.calls == [("guild_consume_in_order", {"arguments": {"queues": ["high", "normal", "low"]},
                                                         "destination": ["gpu0@x"], "reply": False})]
