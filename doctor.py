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


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # reported, but does not make the system unhealthy


def is_healthy(store, min_depth: int = 0) -> bool:
    """The design's queue-depth rule: queued + processing jobs ≥ ``min_depth``."""
    counts = store.status_counts()
    return counts["queued"] + counts["processing"] >= min_depth


def run_checks(settings, min_depth: int = 0, inspect_timeout_s: float = 2.0, min_free: str | None = None
               ) -> list[Check]:
    import redis

    from config.settings import redact_url
    from jobs.store import JobStore

    checks: list[Check] = []
    store = JobStore.connect(settings.redis_url, settings.guild_home, worker=True)
    shown = redact_url(settings.redis_url)
    try:
        store.ping()
        checks.append(Check("redis", True, f"reachable at {shown}"))
    except redis.AuthenticationError:
        checks.append(Check("redis", False, f"{shown} refused the password (wrong password or user)",
                            "fix the password in REDIS_URL (or $GUILD_HOME/redis/url for the embedded Redis)"))
        return checks + _local_checks(settings)
    except redis.RedisError as exc:
        checks.append(Check("redis", False, f"cannot reach {shown}: {exc}",
                            "start it with `make up`, or set REDIS_URL to a running Redis"))
        return checks + _local_checks(settings) + [_disk_check(settings, min_free, None)]
    health = store.server_health()
    checks.append(Check("redis-aof", health.aof_enabled, f"appendonly={'yes' if health.aof_enabled else 'no'}",
                        "turn AOF on (`CONFIG SET appendonly yes` and in redis.conf): without it a Redis crash loses "
                        "queued jobs"))
    checks.append(Check("redis-eviction", health.eviction_policy == "noeviction",
                        f"maxmemory-policy={health.eviction_policy}",
                        "set maxmemory-policy noeviction: any other policy may silently drop queued jobs"))
    wrong = store.check_layout()
    checks.append(Check("redis-layout", not wrong, f"{len(wrong)} Guild key(s) of the wrong type"
                        + (": " + "; ".join(wrong) if wrong else ""),
                        "until then enqueue refuses to write (nothing half-done is left behind)"))
    queues = _active_queues(inspect_timeout_s)
    checks.extend(_worker_checks(queues))
    checks.extend(_local_checks(settings))
    checks.append(_disk_check(settings, min_free, store))
    checks.extend(_job_checks(settings, store, min_depth))
    if queues:
        checks.append(_pause_check(queues, store))
    return checks


def _active_queues(timeout_s: float) -> dict[str, list] | Exception:
    """Every online worker and the queues it consumes (Celery's inspect), or the error asking them."""
    from tasks.app import app

    try:
        return app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as exc:  # noqa: BLE001
        return exc


def _pause_check(queues: dict[str, list], store) -> Check:
    """Unhealthy when every online worker is paused while jobs are queued: nothing will ever run them until an
    operator resumes (a health check wired to alerting must say so, even for a pause that was meant). Paused with
    nothing queued is a warning."""
    if isinstance(queues, Exception):
        return Check("paused", True, "unknown (workers could not be asked)", warning=True)
    paused = sorted(name for name, qs in queues.items() if not qs)
    queued = store.status_counts()["queued"]
    if not paused:
        return Check("paused", True, "no worker is paused")
    fix = "python -m jobs resume" + ("" if len(paused) == len(queues) else " --worker NAME")
    if len(paused) < len(queues):
        return Check("paused", True, f"{len(paused)} of {len(queues)} worker(s) paused: {', '.join(paused)}", fix,
                     warning=True)
    if queued:
        return Check("paused", False, f"every worker is paused ({', '.join(paused)}) and {queued} job(s) are queued: "
                     "nothing runs them", fix)
    return Check("paused", False, f"every worker is paused ({', '.join(paused)}); nothing is queued", fix,
                 warning=True)


def _worker_checks(queues) -> list[Check]:
    if isinstance(queues, Exception):
        return [Check("workers", False, f"cannot ask workers: {queues}", "check the broker URL")]
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
    out.extend(_worker_device_checks(sorted(queues)))
    return out


def _worker_device_checks(worker_names: list[str]) -> list[Check]:
    """Workers on this host named ``gpuN`` or ``gpuA-B`` against the GPUs this host shows (a missing one would
    leave the worker without it)."""
    import socket

    from tasks.device_check import gpus_of, visible_gpus

    here = [n for n in worker_names if n.split("@", 1)[-1] == socket.gethostname() and gpus_of(n) is not None]
    if not here:
        return []
    gpus = {g.index for g in visible_gpus()}
    out = []
    for name in here:
        owned = gpus_of(name)
        missing = [g for g in owned if g not in gpus]
        what = f"GPU {owned[0]}" if len(owned) == 1 else f"GPUs {','.join(map(str, owned))} (one rank each)"
        out.append(Check(f"worker {name} device", not missing,
                         f"named for {what}; this host shows {len(gpus)} GPU(s)"
                         + (f": GPU {','.join(map(str, missing))} missing" if missing else "")
                         + (", it trains on the CPU" if missing and len(missing) == len(owned) else ""),
                         "stop it and start it with the GPUs this host has (make worker GPU=N or GPUS=0,1,...), or a "
                         "CPU worker (make worker GPU=cpu, named cpu0@host)"))
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
    return out


def _disk_check(settings, min_free: str | None, jobs) -> Check:
    """Free space under $GUILD_HOME against the threshold, with what the campaigns' checkpoints use."""
    from campaigns.campaign import CampaignStore
    from campaigns.disk import estimate_checkpoint_bytes, format_bytes, low_disk_threshold
    from jobs.retention import disk_usage

    settings.guild_home.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(settings.guild_home)
    store = CampaignStore(settings.guild_home)
    campaigns = store.list()
    largest = max((estimate_checkpoint_bytes(c, None) for c in campaigns), default=0)
    threshold = low_disk_threshold(usage.total, largest, min_free)
    figures = [disk_usage(store, c, jobs) for c in campaigns]
    used = sum(f.total_bytes for f in figures)
    reclaimable = {c.id: f.reclaimable_bytes for c, f in zip(campaigns, figures) if f.reclaimable_bytes}
    why = f"--min-free {min_free}" if min_free else (
        f"the larger of {format_bytes(0.1 * usage.total)} (10% of the disk) and 3 checkpoints of "
        f"{format_bytes(largest)}")
    detail = (f"{format_bytes(usage.free)} free under {settings.guild_home} (warn below {format_bytes(threshold)}: "
              f"{why}); checkpoints use {format_bytes(used)}")
    if reclaimable:
        detail += f", {format_bytes(sum(reclaimable.values()))} reclaimable"
    fix = "free space or move GUILD_HOME: each job writes checkpoints"
    if reclaimable:
        fix = " and ".join(f"`python -m campaigns prune {name}`" for name in sorted(reclaimable)) + "; or " + fix
    return Check("disk", usage.free >= threshold, detail, fix, warning=True)


def _job_checks(settings, store, min_depth: int) -> list[Check]:
    from campaigns.lock import holder_of

    out = []
    stuck = store.stale_processing(settings.heartbeat_stale_s)
    out.append(Check("stuck-jobs", not stuck, f"{len(stuck)} processing job(s) without a live worker"
                     + (f": {', '.join(stuck)}" if stuck else ""),
                     "start a worker: its sweep puts them back in their queue (or `python -m jobs retry ID`)"))
    stale_locks = []
    for campaign_id, token in sorted(store.campaign_locks().items()):
        holder = holder_of(token) or ""
        job_id = holder.split(":", 1)[1] if ":" in holder else ""  # the holder is "worker:job"
        if not job_id or job_id in stuck or not store.exists(job_id) or store.get(job_id).status.value != "processing":
            stale_locks.append(f"campaign {campaign_id} (held by {holder or '?'})")
    out.append(Check("campaign-locks", not stale_locks, f"{len(stale_locks)} stale campaign lock(s)"
                     + (f": {', '.join(stale_locks)}" if stale_locks else ""),
                     "they expire with their lease (GUILD_HEARTBEAT_STALE_S)"))
    out.append(_rank_check(store.list(status="processing")))
    dead = store.dead_letter_count()
    out.append(Check("dead-letters", dead == 0, f"{dead} message(s) no worker could run, kept aside",
                     "look at them with `python -m jobs dead-letters` (who sent them?), resend the jobs they were for, "
                     "then `python -m jobs dead-letters --clear`", warning=True))
    depth = store.status_counts()
    queue_lengths = store.message_counts()
    healthy = is_healthy(store, min_depth)
    out.append(Check("queue-depth", healthy, f"{depth['queued']} queued, {depth['processing']} processing; "
                     f"messages high={queue_lengths['high']} normal={queue_lengths['normal']} "
                     f"low={queue_lengths['low']} (min depth {min_depth})", "enqueue work: python -m enqueue FILE"))
    return out


def _rank_check(processing) -> Check:
    """Jobs of multi-rank workers: every rank process alive, as their last progress says (a gang that lost a rank
    fails its job within its timeouts; the job is then retried from its checkpoint)."""
    gangs = [(j, j.progress) for j in processing if j.progress and j.progress.get("ranks") is not None]
    short = [f"{j.id} {p['ranks']}/{p['ranks_expected']}" for j, p in gangs if p["ranks"] < p["ranks_expected"]]
    running = ", ".join(f"{j.id} {p['ranks']}/{p['ranks_expected']}" for j, p in gangs if p["ranks"] >=
                        p["ranks_expected"])
    detail = (f"{len(gangs)} multi-rank job(s) running" + (f": {running}" if running else "")
              + (f"; ranks missing: {', '.join(short)}" if short else ""))
    return Check("ranks", not short, detail, "a gang that lost a rank is torn down within GUILD_GANG_TIMEOUT_S and its "
                 "job retried from its last checkpoint; see the worker's log if it persists")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m doctor", description="Check that Guild is healthy.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--min-depth", type=int, default=0, help="unhealthy when fewer jobs are queued or running")
    p.add_argument("--min-free", metavar="SIZE", help="warn below this much free disk under GUILD_HOME (50G, 800M, "
                   "15%%; default: the larger of 10%% of the disk and 3 of the largest campaign checkpoint)")
    args = p.parse_args(argv)
    from config.errors import GuildError
    from config.settings import get_settings

    try:
        checks = run_checks(get_settings(), args.min_depth, min_free=args.min_free)
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
