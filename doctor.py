"""``python -m doctor [--json] [--min-depth N]``: the real health check (Flower's /healthcheck says OK always).

Checks Redis (reachable, AOF on, no key eviction), workers (online, their queues and GPUs), GPU visibility,
hero profiles, campaign locks, free disk under $GUILD_HOME, stuck jobs and queue depth. Exit 0 when healthy,
1 otherwise; each problem is one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

LOW_DISK_BYTES = 20 * 10**9


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # reported, but does not make the system unhealthy


def is_healthy(store, min_depth: int = 0) -> bool:
    """The design's queue-depth rule: queued + processing jobs ≥ ``min_depth``."""
    from jobs import keys

    depth = sum(store.redis.scard(keys.JOBS_BY_STATUS.format(status=s)) for s in ("queued", "processing"))
    return depth >= min_depth


def run_checks(settings, min_depth: int = 0, inspect_timeout_s: float = 2.0) -> list[Check]:
    import redis

    from config.settings import redact_url

    checks: list[Check] = []
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    shown = redact_url(settings.redis_url)
    try:
        client.ping()
        checks.append(Check("redis", True, f"reachable at {shown}"))
    except redis.AuthenticationError:
        checks.append(Check("redis", False, f"{shown} refused the password (wrong password or user)",
                            "fix the password in REDIS_URL (or $GUILD_HOME/redis/url for the embedded Redis)"))
        return checks + _local_checks(settings)
    except redis.RedisError as exc:
        checks.append(Check("redis", False, f"cannot reach {shown}: {exc}",
                            "start it with `make up`, or set REDIS_URL to a running Redis"))
        return checks + _local_checks(settings)
    checks.extend(_redis_durability_checks(client))
    checks.extend(_worker_checks(inspect_timeout_s))
    checks.extend(_local_checks(settings))
    checks.extend(_job_checks(settings, client, min_depth))
    checks.append(_dead_letter_check(settings, client))
    return checks


def _redis_durability_checks(client) -> list[Check]:
    """AOF and eviction, from INFO (allowed to Guild's ACL user, unlike CONFIG GET)."""
    persistence, memory = client.info("persistence"), client.info("memory")
    aof = persistence.get("aof_enabled") in (1, "1")
    policy = memory.get("maxmemory_policy", "?")
    return [
        Check("redis-aof", aof, f"aof_enabled={persistence.get('aof_enabled')}",
              "turn AOF on (appendonly yes in redis.conf, or as the Redis administrator `CONFIG SET appendonly yes`): "
              "without it a Redis crash loses queued jobs"),
        Check("redis-eviction", policy == "noeviction", f"maxmemory_policy={policy}",
              "set maxmemory-policy noeviction (redis.conf): any other policy may silently drop queued jobs"),
    ]


def _worker_checks(timeout_s: float) -> list[Check]:
    from tasks.app import app

    try:
        queues = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:  # noqa: BLE001
        return [Check("workers", False, f"cannot ask workers: {exc}", "check the broker URL")]
    if not queues:
        return [Check("workers", False, "no worker online",
                      "start one per GPU: `make worker GPU=0` (or celery -A tasks worker -Q high,normal,low)")]
    out = []
    for name, qs in sorted(queues.items()):
        names = [q["name"] for q in qs]
        gpu = name.split("@", 1)[0]
        ok = set(names) >= {"high", "normal", "low"}
        out.append(Check(f"worker {name}", ok, f"consumes {','.join(names) or 'nothing (paused)'} ({gpu})",
                         "restart it with -Q high,normal,low or `python -m jobs resume`", warning=not ok))
    return out


def _local_checks(settings) -> list[Check]:
    from heroes.profile import list_heroes

    out = []
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
        gpus = [line for line in result.stdout.splitlines() if line.startswith("GPU")]
        out.append(Check("gpus", bool(gpus), f"{len(gpus)} GPU(s) visible", "check the NVIDIA driver (nvidia-smi)"))
    else:
        out.append(Check("gpus", True, "no NVIDIA GPU on this host: workers here train on the CPU", warning=True))
    heroes, errors = list_heroes(settings.guild_home)
    out.append(Check("heroes", not errors, f"{len(heroes)} valid profile(s)" + (f"; {'; '.join(errors)}" if errors
                                                                                 else ""),
                     "fix the named file and key"))
    settings.guild_home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.guild_home).free
    out.append(Check("disk", free >= LOW_DISK_BYTES, f"{free / 1e9:.1f} GB free under {settings.guild_home}",
                     "free space or move GUILD_HOME: checkpoints need room", warning=True))
    return out


def _job_checks(settings, client, min_depth: int) -> list[Check]:
    from jobs import keys
    from jobs.store import JobStore

    store = JobStore(client, settings.guild_home)
    out = []
    stuck = store.stale_processing(settings.heartbeat_stale_s)
    out.append(Check("stuck-jobs", not stuck, f"{len(stuck)} processing job(s) without a live worker"
                     + (f": {', '.join(stuck)}" if stuck else ""),
                     "start a worker: its sweep puts them back in their queue (or `python -m jobs retry ID`)"))
    stale_locks = []
    for key in client.scan_iter(match=keys.CAMPAIGN_LOCK.format(id="*")):
        holder = (client.get(key) or b"").decode().split("|", 1)[0]
        job_id = holder.split(":", 1)[1] if ":" in holder else ""
        if not job_id or job_id in stuck or not store.exists(job_id) or store.get(job_id).status.value != "processing":
            stale_locks.append(key.decode())
    out.append(Check("campaign-locks", not stale_locks, f"{len(stale_locks)} stale campaign lock(s)"
                     + (f": {', '.join(stale_locks)}" if stale_locks else ""),
                     "they expire with their lease; if not, delete the key"))
    depth = {s: client.scard(keys.JOBS_BY_STATUS.format(status=s)) for s in ("queued", "processing")}
    queue_lengths = {q: client.llen(keys.celery_key(q)) for q in keys.PRIORITIES}
    healthy = is_healthy(store, min_depth)
    out.append(Check("queue-depth", healthy, f"{depth['queued']} queued, {depth['processing']} processing; "
                     f"messages high={queue_lengths['high']} normal={queue_lengths['normal']} "
                     f"low={queue_lengths['low']} (min depth {min_depth})", "enqueue work: python -m enqueue FILE"))
    return out


def _dead_letter_check(settings, client) -> Check:
    """Messages no worker could run (tasks/poison.py): moved aside, not lost, but someone sent them."""
    from jobs.store import JobStore

    count = JobStore(client, settings.guild_home).dead_letter_count()
    return Check("dead-letters", count == 0, f"{count} message(s) no worker could run" if count else "none",
                 "look at them with `python -m jobs dead-letters` (who sent them?), then `--clear`", warning=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m doctor", description="Check that Guild is healthy.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--min-depth", type=int, default=0, help="unhealthy when fewer jobs are queued or running")
    args = p.parse_args(argv)
    from config.errors import GuildError
    from config.settings import get_settings

    try:
        checks = run_checks(get_settings(), args.min_depth)
    except GuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    healthy = all(c.ok or c.warning for c in checks)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("warn" if c.warning else "FAIL")
            print(f"{mark} {c.name}: {c.detail}" + (f" — fix: {c.fix}" if not c.ok and c.fix else ""))
        print("healthy" if healthy else "UNHEALTHY")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
