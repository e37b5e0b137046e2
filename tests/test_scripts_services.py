"""scripts/services.sh: the name of a worker that owns several GPUs, and that Celery takes such a name."""

from __future__ import annotations

import subprocess

import pytest

from tests.services import REPO, wait_until


def label(gpus: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "name", gpus], capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("gpus, name", [("0", "gpu0"), ("12", "gpu12"), ("0,1,2,3", "gpu0-3"), ("3,2,1,0", "gpu0-3"),
                                        ("0,2", "gpu0+2"), ("0,1,2,5", "gpu0-2+5"), ("1,3,4,5,7", "gpu1+3-5+7")])
def test_worker_names_say_which_gpus_it_owns(gpus, name):
    done = label(gpus)
    assert (done.returncode, done.stdout.strip()) == (0, name)


@pytest.mark.parametrize("gpus, problem", [("0,0", "GPUS=0,0: a GPU is listed twice"),
                                           ("0,,1", "GPUS=0,,1: expected GPU indices separated by commas, e.g. "
                                                    "GPUS=0,1,2,3"),
                                           ("all", "GPUS=all: expected GPU indices")])
def test_a_bad_gpu_list_is_refused_in_one_line(gpus, problem):
    done = label(gpus)
    assert done.returncode == 2 and done.stderr.strip().startswith(problem) and len(done.stderr.splitlines()) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_celery_takes_a_multi_gpu_worker_name(start_worker, store, guild_env):
    from celery import Celery

    from jobs.control import live_workers

    start_worker("gpu0-1+3@test")
    app = Celery(broker=guild_env["REDIS_URL"])  # its own app: tasks.app may be bound to another Redis by now
    try:
        replies = app.control.inspect(destination=["gpu0-1+3@test"], timeout=5).ping() or {}
    finally:
        app.close()
    assert list(replies) == ["gpu0-1+3@test"]
    wait_until(lambda: "gpu0-1+3@test" in live_workers(store, 60), timeout_s=60, what="the worker's first sweep")
