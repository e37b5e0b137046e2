"""The processes of the fleet benchmark: one redis-server (AOF, restartable on its port and data directory) and N
real Celery workers, each stopped by its pid; plus what is sampled from them (CPU time, PSS, Redis INFO).

Everything started here is a child in its own session; :meth:`Fleet.stop` ends every one of them by pid (SIGTERM,
a bounded wait, then SIGKILL), also after a failure or Ctrl-C (the caller runs it in ``finally``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.services import REPO, RedisServer, free_port, wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS (KiB) of one process (PSS shares forked pages between a worker and its pool child)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------------- workers


@dataclass
class WorkerRun:
    """One incarnation of a named worker (a restarted worker is a new run of the same name)."""

    name: str
    incarnation: int
    log_path: Path
    proc: subprocess.Popen
    started_at: float
    killed_at: float | None = None
    cpu: dict[int, float] = field(default_factory=dict)  # pid → latest CPU seconds seen (main and pool child)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)] if self.proc.poll() is None else []

    def sample_cpu(self) -> None:
        for pid in self.pids():
            value = cpu_seconds(pid)
            if value is not None:
                self.cpu[pid] = max(value, self.cpu.get(pid, 0.0))

    def memory(self) -> dict[str, int]:
        """RSS and PSS of the worker and its pool child together (KiB)."""
        total = {"rss": 0, "pss": 0, "processes": 0}
        for pid in self.pids():
            found = memory_kib(pid)
            total["rss"] += found.get("rss", 0)
            total["pss"] += found.get("pss", 0)
            total["processes"] += 1
        return total


class Fleet:
    """A redis-server and named Celery workers for one benchmark run.

    Args:
        workdir: everything goes under it (Redis' data, logs).
        env: the workers' environment (REDIS_URL is added).
    """

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.redis_dir = self.workdir / "redis"
        self.env = env
        self.redis_servers: list[RedisServer] = []
        self.redis_kills: list[dict[str, float]] = []
        self.runs: list[WorkerRun] = []
        self._lock = threading.Lock()

    # ---- redis

    @property
    def url(self) -> str:
        """What Guild connects with (workers, enqueue, the store): the ``guild`` ACL user, as in production."""
        return self._server().url

    @property
    def admin_url(self) -> str:
        """The benchmark's own inspection (INFO, MEMORY USAGE, CONFIG RESETSTAT, the capacity probe's keys)."""
        return self._server().admin_url

    def _server(self) -> RedisServer:
        # the passwords live in the data directory: every incarnation of the server has the same URLs
        return self.redis_servers[-1] if self.redis_servers else RedisServer(self.redis_dir, port=self.port)

    @property
    def redis_pid(self) -> int | None:
        server = self.redis_servers[-1] if self.redis_servers else None
        return server.proc.pid if server and server.proc and server.proc.poll() is None else None

    def start_redis(self) -> None:
        self.redis_servers.append(RedisServer(self.redis_dir, port=self.port).start())

    def kill_redis(self) -> float:
        """``kill -9`` the redis-server by pid; returns when it was killed."""
        server = self.redis_servers[-1]
        at = time.time()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        self.redis_kills.append({"killed_at": at})
        return at

    def restart_redis(self) -> float:
        """Start redis-server again on the same port and data directory (it replays its AOF); returns when it
        answers."""
        self.start_redis()
        at = time.time()
        self.redis_kills[-1]["back_at"] = at
        return at

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.admin_url, socket_connect_timeout=5, socket_timeout=30)

    # ---- workers

    def start_worker(self, name: str) -> WorkerRun:
        incarnation = sum(1 for r in self.runs if r.name == name)
        log_path = self.workdir / "logs" / f"{name.replace('@', '_')}.{incarnation}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "high,normal,low", "-n", name,
                 "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO", "--without-mingle",
                 "--without-gossip"],
                cwd=REPO, env={**self.env, "REDIS_URL": self.url}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        run = WorkerRun(name, incarnation, log_path, proc, time.time())
        with self._lock:
            self.runs.append(run)
        return run

    def wait_ready(self, runs: list[WorkerRun], timeout_s: float) -> None:
        """Until every run logged ``ready.``; raises (naming the worker and its log's tail) when one exits."""

        def ready() -> bool:
            for run in runs:
                if run.proc.poll() is not None:
                    tail = run.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker {run.name} exited with {run.proc.returncode}:\n{tail}")
            return all(b" ready." in run.log_path.read_bytes() for run in runs)

        wait_until(ready, timeout_s, interval_s=0.5, what=f"{len(runs)} workers ready")

    def kill_worker(self, run: WorkerRun) -> float:
        """``kill -9`` the worker's process group (the worker and its pool child)."""
        run.sample_cpu()
        at = time.time()
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.proc.wait(timeout=10)
        run.killed_at = at
        return at

    def live_runs(self) -> list[WorkerRun]:
        with self._lock:
            return [r for r in self.runs if r.proc.poll() is None]

    def sample_cpu(self) -> None:
        for run in self.live_runs():
            run.sample_cpu()

    def worker_cpu_seconds(self) -> float:
        return sum(sum(r.cpu.values()) for r in self.runs)

    # ---- the end

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to every live worker's process group at once (warm shutdown: unacked messages go back to their
        queues), one shared bounded wait, then SIGKILL for the rest."""
        live = self.live_runs()
        for run in live:
            run.sample_cpu()
            _signal_group(run.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for run in live:
            try:
                run.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(run.pid, signal.SIGKILL)
                run.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop everything this fleet started, by pid (safe to call twice)."""
        try:
            self.stop_workers()
        finally:
            for server in self.redis_servers:
                server.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ redis INFO


@dataclass
class InfoSnapshot:
    """The Redis counters the benchmark compares between two moments."""

    at: float
    commands: dict[str, int]  # command → calls (INFO commandstats)
    usec: dict[str, int]  # command → microseconds spent executing it
    net_in: int
    net_out: int
    used_memory: int
    used_memory_rss: int
    cpu_s: float  # used_cpu_sys + used_cpu_user of the server (main thread and I/O)
    keys: int

    @classmethod
    def take(cls, client: redis.Redis) -> InfoSnapshot:
        info = client.info("all")
        commands, usec = {}, {}
        for key, value in info.items():
            if key.startswith("cmdstat_") and isinstance(value, dict):
                commands[key[len("cmdstat_"):]] = int(value.get("calls", 0))
                usec[key[len("cmdstat_"):]] = int(value.get("usec", 0))
        keyspace = info.get("db0") or {}
        return cls(at=time.time(), commands=commands, usec=usec, net_in=int(info["total_net_input_bytes"]),
                   net_out=int(info["total_net_output_bytes"]), used_memory=int(info["used_memory"]),
                   used_memory_rss=int(info["used_memory_rss"]),
                   cpu_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
                   keys=int(keyspace.get("keys", 0)) if isinstance(keyspace, dict) else 0)

    def minus(self, earlier: InfoSnapshot) -> dict:
        """What happened between ``earlier`` and this snapshot (the INFO calls of the benchmark left out)."""
        calls = {k: v - earlier.commands.get(k, 0) for k, v in self.commands.items()}
        calls = {k: v for k, v in calls.items() if v > 0 and k != "info"}
        usec = {k: self.usec[k] - earlier.usec.get(k, 0) for k in calls}
        return {"seconds": self.at - earlier.at, "commands": sum(calls.values()), "by_command": calls,
                "usec_by_command": usec, "net_in": self.net_in - earlier.net_in,
                "net_out": self.net_out - earlier.net_out, "used_memory": self.used_memory - earlier.used_memory,
                "cpu_s": self.cpu_s - earlier.cpu_s}


def subtract(delta: dict, counts: dict[str, int]) -> dict:
    """``delta`` less the commands in ``counts`` (the benchmark's own, counted on its client)."""
    by = dict(delta["by_command"])
    for name, calls in counts.items():
        if name in by:
            by[name] = max(by[name] - calls, 0)
    return {**delta, "by_command": {k: v for k, v in by.items() if v}, "commands": sum(by.values())}


def add_deltas(parts: list[dict]) -> dict:
    """Several deltas summed (a Redis restart resets its counters: the run is measured in segments)."""
    total = {"seconds": 0.0, "commands": 0, "by_command": {}, "usec_by_command": {}, "net_in": 0, "net_out": 0,
             "used_memory": 0, "cpu_s": 0.0}
    for part in parts:
        for key in ("seconds", "commands", "net_in", "net_out", "used_memory", "cpu_s"):
            total[key] += part[key]
        for key in ("by_command", "usec_by_command"):
            for name, value in part[key].items():
                total[key][name] = total[key].get(name, 0) + value
    return total


# ------------------------------------------------------------------------------------- counting and capacity


class _CountingPipeline(redis.client.Pipeline):
    counts: dict[str, int]

    def execute(self, raise_on_error: bool = True):
        for args, _options in self.command_stack:
            _count(self.counts, args[0])
        if self.command_stack and self.transaction:
            _count(self.counts, "multi")
            _count(self.counts, "exec")
        return super().execute(raise_on_error)

    def immediate_execute_command(self, *args, **options):
        _count(self.counts, args[0])
        return super().immediate_execute_command(*args, **options)


class _CountingRedis(redis.Redis):
    counts: dict[str, int]

    def execute_command(self, *args, **options):
        _count(self.counts, args[0])
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = _CountingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.counts = self.counts
        return pipe


def _count(counts: dict[str, int], command) -> None:
    name = (command.decode() if isinstance(command, bytes) else str(command)).split()[0].lower()
    counts[name] = counts.get(name, 0) + 1


def counting_store(url: str, home: Path):
    """A JobStore whose client counts the commands it sends, by name (the returned dict): the benchmark's own
    reads are subtracted from the run's figures, and one sweep is costed mid-run."""
    from jobs.store import JobStore

    client = _CountingRedis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    client.counts = {}
    return JobStore(client, home), client.counts


_LOAD = """
import sys, time, redis
url, start, seconds, depth = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
r = redis.Redis.from_url(url)
sha = r.script_load("return redis.call('hset', KEYS[1], 'heartbeat_at', ARGV[1])")
time.sleep(max(start - time.time(), 0))
end, i = start + seconds, 0
while time.time() < end:
    if depth <= 1:
        r.evalsha(sha, 1, f"cap:{i % 1000}", i); r.hget(f"cap:{i % 1000}", "heartbeat_at"); i += 1
    else:
        p = r.pipeline(transaction=False)
        for k in range(depth):
            p.evalsha(sha, 1, f"cap:{(i + k) % 1000}", i); p.hget(f"cap:{(i + k) % 1000}", "heartbeat_at")
        p.execute(); i += depth
"""


def redis_capacity(url: str, seconds: float, clients: int = 2) -> dict:
    """What this redis-server does per second of its own CPU, redis-benchmark style: ``clients`` processes send a
    beat-like script call and an HGET, one round trip each (as Guild's workers do) and then pipelined 50 deep.
    On a loaded 2-core machine the clients compete with Redis, so the useful figure is commands per Redis
    CPU-second: what one Redis core does when it is the bottleneck."""
    client = redis.Redis.from_url(url)
    out = {}
    for name, depth in (("round_trips", 1), ("pipelined_50", 50)):
        start = time.time() + 2.0  # every client connected and its script loaded: the window starts together
        procs = [subprocess.Popen([sys.executable, "-c", _LOAD, url, str(start), str(seconds), str(depth)],
                                  cwd=REPO, start_new_session=True) for _ in range(clients)]
        time.sleep(max(start - time.time(), 0))
        a = InfoSnapshot.take(client)
        time.sleep(seconds)
        d = InfoSnapshot.take(client).minus(a)
        for proc in procs:
            try:
                proc.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        out[name] = {"commands_per_s": round(d["commands"] / d["seconds"]),
                     "redis_cpu_share": round(d["cpu_s"] / d["seconds"], 2),
                     "commands_per_redis_cpu_s": round(d["commands"] / d["cpu_s"]) if d["cpu_s"] else None}
    for key in client.scan_iter(match="cap:*", count=1000):
        client.delete(key)
    return out
