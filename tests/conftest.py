"""Shared fixtures: a real redis-server for the session, a fresh $GUILD_HOME and database per test, workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.services import REPO, RedisServer, Worker

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_hero_dir(tmp_path_factory) -> Path:
    """The tiny hero, built once per session (about 7 s) and linked into each test's $GUILD_HOME."""
    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    home = tmp_path_factory.mktemp("hero-home")
    return Path(ensure_model(load_hero("tiny-qwen3"), home))


@pytest.fixture
def guild_home(tmp_path, tiny_hero_dir) -> Path:
    home = tmp_path / "guild-home"
    (home / "heroes").mkdir(parents=True)
    os.symlink(tiny_hero_dir, home / "heroes" / "tiny-qwen3")
    return home


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.admin_url)  # Guild itself connects as the ACL user (redis_server.url)
    client.flushall()
    yield client
    client.flushall()


@pytest.fixture
def guild_env(redis_server, redis_client, guild_home, monkeypatch) -> dict[str, str]:
    """Environment for CLI and worker subprocesses; also applied to this process (settings cache reset)."""
    from config.settings import reset_settings_cache

    env = dict(os.environ)
    env.update({"REDIS_URL": redis_server.url, "GUILD_HOME": str(guild_home), "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    env.pop("ENABLE_PACKING", None)
    for key in ("REDIS_URL", "GUILD_HOME"):
        monkeypatch.setenv(key, env[key])
    reset_settings_cache()
    yield env
    reset_settings_cache()


@pytest.fixture
def run_cli(guild_env):
    """Run ``python -m MODULE args`` as a user would; returns the CompletedProcess."""

    def run(module: str, *args: str, timeout: float = 60, extra_env: dict | None = None):
        env = {**guild_env, **(extra_env or {})}
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    return run


@pytest.fixture
def start_worker(guild_env, tmp_path):
    """Start real worker processes; every one is stopped by its pid at the end of the test."""
    workers: list[Worker] = []

    def start(name: str = "gpu0@test", wait_ready: bool = True, env: dict | None = None) -> Worker:
        w = Worker({**guild_env, **(env or {})}, name, tmp_path / f"{name.replace('@', '_')}.log")
        workers.append(w)
        return w.start(wait_ready=wait_ready)

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def store(redis_client, guild_env, guild_home):
    from jobs.store import JobStore

    return JobStore(redis_client, guild_home)
