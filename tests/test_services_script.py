"""scripts/services.sh: logs are appended and rotated, CPU workers are explicit, a refused start is reported, and a
worker that owns several GPUs is named for them (a name Celery takes)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.services import REPO, wait_until

SCRIPT = REPO / "scripts" / "services.sh"


def _sh(env, *args, timeout=150):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def script_env(guild_env, guild_home):
    """The environment for services.sh; whatever it started is stopped by pid at the end."""
    env = {**guild_env, "GUILD_LOG_MAX_BYTES": "1000", "GUILD_LOG_KEEP": "2"}
    yield env
    _sh(env, "down", timeout=60)
    for pidf in (guild_home / "run").glob("*.pid"):  # belt and braces: anything `down` missed
        try:
            os.kill(int(pidf.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_rotate_keeps_a_few_and_drops_the_oldest(tmp_path, script_env):
    log = tmp_path / "w.log"
    for text in ("one", "two", "three"):
        log.write_text(text)
        assert _sh(script_env, "rotate", str(log)).returncode == 0
    assert log.read_text() == ""
    assert (tmp_path / "w.log.1").read_text() == "three" and (tmp_path / "w.log.2").read_text() == "two"
    assert not (tmp_path / "w.log.3").exists()  # GUILD_LOG_KEEP=2


@pytest.mark.integration
@pytest.mark.slow
def test_a_restarted_cpu_worker_appends_to_its_log_and_rotates_a_big_one(script_env, guild_home):
    log = guild_home / "logs" / "worker-cpu0.log"
    log.parent.mkdir(parents=True)
    old = "the crash that mattered\n" * 50  # past GUILD_LOG_MAX_BYTES=1000: rotated at the next start
    log.write_text(old)
    first = _sh(script_env, "worker", "cpu")
    assert first.returncode == 0 and "worker cpu0 ready" in first.stdout, first.stdout + first.stderr
    assert (guild_home / "logs" / "worker-cpu0.log.1").read_text() == old
    assert f"cpu0@{os.uname().nodename} ready." in log.read_text()
    assert _sh(script_env, "down").returncode == 0
    script_env["GUILD_LOG_MAX_BYTES"] = str(10**9)
    again = _sh(script_env, "worker", "cpu")
    assert again.returncode == 0, again.stderr
    assert log.read_text().count("starting worker cpu0@") == 2  # appended, not overwritten
    assert log.read_text().count("ready.") == 2


@pytest.mark.integration
def test_a_worker_for_a_gpu_this_host_lacks_fails_to_start_with_the_reason(script_env, guild_home):
    from tasks.device_check import visible_gpus

    if visible_gpus():
        pytest.skip("this host has a GPU")
    out = _sh(script_env, "worker", "3")
    assert out.returncode == 1
    assert "worker gpu3 exited at start" in out.stderr and "CUDA_VISIBLE_DEVICES=3 names GPU 3" in out.stderr
    assert not (guild_home / "run" / "worker-gpu3.pid").exists()
    bad = _sh(script_env, "worker", "two")
    assert bad.returncode == 2 and "use a GPU index (0, 1, ...)" in bad.stderr and "cpu (a CPU worker)" in bad.stderr

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

    start_worker("gpu0-1+3@test")
    from celeryconfig import broker_transport_options

    app = Celery(broker=guild_env["REDIS_URL"])  # its own app: tasks.app may be bound to another Redis by now
    app.conf.broker_transport_options = broker_transport_options  # the guild-celery: prefix the ACL allows
    try:
        replies = app.control.inspect(destination=["gpu0-1+3@test"], timeout=5).ping() or {}
    finally:
        app.close()
    assert list(replies) == ["gpu0-1+3@test"]
    wait_until(lambda: "gpu0-1+3@test" in store.live_workers(60), timeout_s=60, what="the worker's first sweep")
