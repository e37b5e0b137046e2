"""Shared pieces of the reliability scenarios (tests/test_reliability_*.py): datasets, waits, figures.

The scenarios drive real processes (redis-server, Celery workers, CLIs) and kill them by pid. Each one prints
its figures and appends them to ``test-artifacts/reliability/figures.jsonl``; RELIABILITY.md keeps the table.

Run as a module, this file is also the in-process enqueue loop of the Redis-kill scenario
(``python -m tests.reliability_helpers produce DIR CAMPAIGN``): it must run in a fresh process, because the Celery app
reads its broker URL once, at import.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from jobs.queues import celery_key
from tests.services import REPO, RedisServer, free_port, stop_pid, wait_until

FIGURES = REPO / "test-artifacts" / "reliability" / "figures.jsonl"
FINAL = ("completed", "failed", "skipped", "cancelled")

# A short job on the tiny hero: checkpoints every 3 steps, no evaluation, 128-token rows.
SHORT_SETS = ["max_steps=20", "save_steps=3", "max_length=128", "eval_fraction=0"]
SHORT_JOB = [arg for pair in SHORT_SETS for arg in ("--set", pair)]


# ------------------------------------------------------------------------------------------------- figures


def record_figure(scenario: str, **figures) -> dict:
    """Print one scenario's figures and append them (with the time) to the figures file."""
    entry = {"scenario": scenario, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **figures}
    print(f"\nRELIABILITY {scenario}: {json.dumps(figures, sort_keys=True)}", flush=True)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with open(FIGURES, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


# --------------------------------------------------------------------------------------------------- redis


class OwnRedis:
    """A redis-server of one test's own (not the session's), which the test may kill and restart: a restart uses
    the same port and data directory, so Redis replays its AOF."""

    def __init__(self, data_dir: Path, password: str | None = None):
        self.data_dir, self.port, self.password = Path(data_dir), free_port(), password
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        return RedisServer(self.data_dir, self.port, self.password).url

    def start(self) -> OwnRedis:
        self.servers.append(RedisServer(self.data_dir, self.port, self.password).start())
        return self

    def kill(self) -> None:
        self.servers[-1].kill()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


# ------------------------------------------------------------------------------------------------ datasets


def write_dataset(path: Path, tag: str, lines: int = 12, fmt: str = "prompt_response") -> Path:
    """A small valid dataset whose content depends on ``tag`` (so each tag is a distinct sha256)."""
    rng = random.Random(tag)
    rows = []
    for _ in range(lines):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": f"[{tag}] {a} + {b}?"},
                                      {"role": "assistant", "content": f"{a + b}"}]})
        elif fmt == "text":
            rows.append({"text": f"[{tag}] {a} plus {b} is {a + b}."})
        else:
            rows.append({"prompt": f"[{tag}] What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------- jobs


def enqueue_ids(run_cli, *args: str, extra_env: dict | None = None, timeout: float = 120) -> list[str]:
    """``python -m enqueue ARGS --json``; the ids of the jobs it reports as queued (asserts exit 0)."""
    out = run_cli("enqueue", *args, "--json", extra_env=extra_env, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return [j["id"] for j in json.loads(out.stdout)]


def wait_final(store, job_ids: list[str], timeout_s: float = 120):
    """Wait until every job is in a final state; return the Jobs."""

    def done():
        jobs = [store.get(i) for i in job_ids]
        return jobs if all(j.status.value in FINAL for j in jobs) else None

    return wait_until(done, timeout_s, interval_s=0.2, what=f"jobs {job_ids} to finish")


class Submitter:
    """Enqueue through :func:`jobs.submit.submit` in this process: what ``python -m enqueue`` does, without its
    second of interpreter start-up. Messages go out through a Celery app bound to ``broker_url`` (the project's
    app reads its broker URL once, at import, so it is not used here)."""

    def __init__(self, broker_url: str):
        from celery import Celery

        from celeryconfig import broker_transport_options

        self.app = Celery("guild-reliability-tests", broker=broker_url, set_as_current=False)
        # The same key prefix as the project's app (guild-celery:), or the messages land where no worker looks.
        self.app.conf.broker_transport_options = broker_transport_options

    def __call__(self, *paths, campaign: str | None = None, sets: list[str] = (), force: bool = False,
                 priority: str = "normal") -> list[str]:
        from config.layers import parse_set_args
        from config.settings import get_settings
        from jobs.store import JobStore
        from jobs.submit import SubmitRequest, submit
        from tasks.publish import CeleryPublisher

        settings = get_settings()
        store = JobStore.connect(settings.redis_url, settings.guild_home)
        request = SubmitRequest(paths=[str(p) for p in paths], priority=priority, campaign=campaign,
                                sets=parse_set_args(list(sets)), force=force)
        jobs = submit(settings, store, request, CeleryPublisher(self.app, store))
        return [job.id for job in jobs]

    def close(self) -> None:
        self.app.close()


def queue_messages(client, queue: str) -> list[dict]:
    """The Celery messages waiting in one kombu queue list, decoded (headers hold the task id)."""
    return [json.loads(raw) for raw in client.lrange(celery_key(queue), 0, -1)]


def queued_task_ids(client, queues=("high", "normal", "low")) -> list[str]:
    """Task ids (= job ids) of every message waiting in the queue lists, duplicates kept."""
    return [m["headers"]["id"] for q in queues for m in queue_messages(client, q)]


def unacked_task_ids(client) -> list[str]:
    """Task ids of the messages workers hold (delivered, not acked yet): kombu's ``unacked`` hash."""
    return [json.loads(raw)[0]["headers"]["id"] for raw in client.hvals(celery_key("unacked"))]


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text


def run_clis_at_once(env: dict, calls: list[list[str]], timeout_s: float = 120) -> list[subprocess.CompletedProcess]:
    """Start ``python -m ARGS`` for every call at the same time; wait for all (each stopped by pid on timeout)."""
    procs = [subprocess.Popen([sys.executable, "-m", *call], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for call in calls]
    results = []
    deadline = time.monotonic() + timeout_s
    try:
        for call, proc in zip(calls, procs):
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append(subprocess.CompletedProcess(call, proc.returncode, out, err))
    finally:
        for proc in procs:
            stop_pid(proc)
    return results


# --------------------------------------------------------------------------------------- the enqueue loop


def produce(directory: Path, campaign: str, sets: list[str]) -> int:
    """Enqueue every ``*.jsonl`` of ``directory`` (sorted), one :func:`jobs.submit.submit` call per file.

    Prints ``QUEUED <job id>`` (flushed) once each submit has returned, i.e. once the job is reported as queued,
    and ``ERROR <text>`` then exits 1 at the first failure (Redis killed under it).
    """
    import redis

    from config.layers import parse_set_args
    from config.settings import get_settings
    from jobs.store import JobStore
    from jobs.submit import SubmitRequest, submit
    from tasks.app import app
    from tasks.publish import CeleryPublisher

    settings = get_settings()
    store = JobStore(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5),
                     settings.guild_home)
    publish = CeleryPublisher(app, store)
    config_sets = parse_set_args(sets)
    for path in sorted(directory.glob("*.jsonl")):
        request = SubmitRequest(paths=[str(path)], campaign=campaign, sets=config_sets)
        try:
            [job] = submit(settings, store, request, publish)
        except Exception as exc:  # noqa: BLE001 - the point is to stop at the first failure, whatever it is
            print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
            return 1
        print(f"QUEUED {job.id}", flush=True)
    print("DONE", flush=True)
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "produce":
        return produce(Path(argv[1]), argv[2], argv[3:])
    print("usage: python -m tests.reliability_helpers produce DIR CAMPAIGN [KEY=VALUE ...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
