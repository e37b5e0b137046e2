"""Fleet benchmark: many real Celery workers, thousands of jobs, one Redis; the queue's guarantees checked at scale.

    .venv/bin/python bench/fleet.py                              # 32 workers, 5,000 jobs, 50 campaigns
    .venv/bin/python bench/fleet.py --faults                     # + 4 worker kill -9s and a Redis kill -9 mid-run
    .venv/bin/python bench/fleet.py --workers 4 --jobs 200 --campaigns 8 --steady-s 0   # quick

What runs is the product: ``celery -A tasks worker -Q high,normal,low --concurrency 1 --prefetch-multiplier 1``
(named ``gpuN@fleet``), the real submit path (``jobs.submit.submit``, one call per batch of files, as
``python -m enqueue`` does), the real job store, lifecycle, campaign lock and sweeper, on a redis-server this
benchmark starts on a free loopback port with AOF (fsync always). Only training is a stand-in
(``GUILD_ENGINE_FACTORY=bench.fleet_engine:engine``: it sleeps through its steps, no torch) that logs when each run
starts and ends.

Checked (exit 1 when one fails; see bench/fleet_analysis.py for the exact definitions):
  - every job ends exactly once: completed once, nothing lost, nothing extra, none trained to its end twice, every
    campaign advanced by exactly steps x its jobs;
  - one campaign never trains on two workers at once (engine intervals and processing intervals);
  - strict priority: no job is claimed while a job of higher priority had been eligible (campaign idle, its turn)
    for longer than the tolerance (a message in flight) without any worker taking it.
Measured: dispatch latency and pick-up p50/p99, Redis commands, bytes, CPU and memory per job, the Redis cost of a
running job per second and of an idle worker, the sweep's cost, throughput and what bounds it, worker memory.

Writes a JSON of everything (``--json``, default ``.bench/fleet.json`` or ``.bench/fleet-faults.json``) and prints a
summary. Every process it starts is stopped by its pid at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import fleet_analysis as analysis  # noqa: E402
from bench.fleet_procs import Fleet, InfoSnapshot, add_deltas, counting_store, redis_capacity, subtract  # noqa: E402

logger = logging.getLogger("fleet")

HERO = "tiny-qwen3"
PRIORITIES = ("high", "normal", "low")


@dataclass
class FleetConfig:
    workers: int = 32
    jobs: int = 5000
    campaigns: int = 50
    # 10 steps of 0.1 s: a job trains 1 s, long enough that the fleet's 32 workers can all hold a job at once on 2
    # cores (a job's own CPU, ~0.15 s, is spread over its second), short enough for 5,000 jobs in ~30 min.
    steps: int = 10
    step_s: float = 0.1
    save_steps: int = 3
    mix: tuple[float, float, float] = (0.2, 0.5, 0.3)  # high, normal, low shares of the batches
    max_batch: int = 10  # files per enqueue call: 1..max_batch (one campaign, one priority per call)
    # 5% enqueued before the workers start (a backlog of 250), the rest at ~3.2 jobs/s while they run: below what
    # the 2-core machine's CPUs sustain (~570 jobs/min at 0.21 CPU-s a job, RESULTS.md, "Fleet").
    preload: float = 0.05
    feed_s: float = 1500.0  # the rest arrives evenly over this many seconds
    stale_s: float = 15.0  # GUILD_HEARTBEAT_STALE_S of the workers
    faults: bool = False
    kill_workers: int = 4
    kill_at: float = 0.4  # share of jobs completed when the workers are killed
    restart_after_s: float = 5.0  # the killed workers come back after this (as systemd's Restart= would); <0: never
    redis_kill_at: float = 0.55
    redis_down_s: float = 2.0
    idle_s: float = 5.0
    steady_s: float = 10.0  # 0: no steady-state phase
    capacity_s: float = 3.0  # 0: no Redis capacity probe
    timeout_s: float = 3600.0
    seed: int = 1

    @property
    def job_s(self) -> float:
        return self.steps * self.step_s


@dataclass
class Batch:
    campaign: str
    priority: str
    paths: list[str]


# ------------------------------------------------------------------------------------------------- set-up


def make_batches(cfg: FleetConfig, data_dir: Path) -> list[Batch]:
    """The enqueue calls of the run (seeded): random campaign, priority and size; one distinct tiny file per job."""
    rng = random.Random(cfg.seed)
    batches, made = [], 0
    data_dir.mkdir(parents=True, exist_ok=True)
    while made < cfg.jobs:
        n = min(rng.randint(1, cfg.max_batch), cfg.jobs - made)
        campaign = f"fleet-{rng.randrange(cfg.campaigns):02d}"
        priority = rng.choices(PRIORITIES, weights=cfg.mix)[0]
        paths = []
        for _ in range(n):
            path = data_dir / f"d{made:05d}.jsonl"
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            path.write_text(json.dumps({"prompt": f"[{made}] {a} + {b}?", "response": f"{a + b}"}) + "\n"
                            + json.dumps({"prompt": f"[{made}] {a} - {b}?", "response": f"{a - b}"}) + "\n")
            paths.append(str(path))
            made += 1
        batches.append(Batch(campaign, priority, paths))
    return batches


class Submitter:
    """The real submit path, in this process: ``jobs.submit.submit`` with the project's Celery app."""

    def __init__(self, cfg: FleetConfig, home: Path, url: str):
        from config.settings import get_settings
        from jobs.store import JobStore
        from tasks.app import app
        from tasks.publish import CeleryPublisher

        self.settings = get_settings()
        self.store = JobStore.connect(url, home)
        self.publish = CeleryPublisher(app, self.store)
        self.sets = {"max_steps": str(cfg.steps), "save_steps": str(cfg.save_steps)}
        self.ids: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, batch: Batch, sets: dict[str, str] | None = None) -> list[str]:
        from jobs.submit import SubmitRequest, submit

        request = SubmitRequest(paths=batch.paths, priority=batch.priority, hero_id=HERO, campaign=batch.campaign,
                                sets=sets or self.sets)
        ids = [job.id for job in submit(self.settings, self.store, request, self.publish)]
        with self._lock:
            self.ids.extend(ids)
        return ids


class Feeder(threading.Thread):
    """Submits the remaining batches evenly over ``span_s`` while the workers run. :meth:`hold` pauses it between two
    enqueue calls (for a Redis kill: an enqueue cut by it is reliability scenario 3's subject, not this one's)."""

    def __init__(self, submitter: Submitter, batches: list[Batch], span_s: float):
        super().__init__(daemon=True, name="feeder")
        self.submitter, self.batches, self.span_s = submitter, batches, span_s
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._halt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._between = threading.Lock()  # held while an enqueue call runs

    def run(self) -> None:
        start = time.monotonic()
        try:
            for i, batch in enumerate(self.batches):
                due = start + self.span_s * i / max(len(self.batches), 1)
                if self._halt.wait(max(due - time.monotonic(), 0)):
                    return
                self._go.wait()
                with self._between:
                    self.submitter(batch)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.finished_at = time.time()

    def hold(self) -> None:
        """Returns once no enqueue call runs and none will start until :meth:`release`."""
        self._go.clear()
        self._between.acquire()
        self._between.release()

    def release(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._halt.set()
        self._go.set()


# ------------------------------------------------------------------------------------------------ the run


class Recorder:
    """Redis counters in segments (a Redis restart resets them) and the fleet's CPU, sampled as the run goes."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.client = fleet.client()
        self.segments: list[dict] = []
        self._start = InfoSnapshot.take(self.client)
        self.last = self._start

    def sample(self) -> None:
        try:
            self.last = InfoSnapshot.take(self.client)
        except Exception:  # noqa: BLE001 - Redis restarting
            pass
        self.fleet.sample_cpu()

    def close_segment(self) -> None:
        """Before Redis is killed: what this server counted."""
        self.last = InfoSnapshot.take(self.client)
        self.segments.append(self.last.minus(self._start))

    def open_segment(self) -> None:
        self.client = self.fleet.client()
        self._start = self.last = InfoSnapshot.take(self.client)

    def total(self) -> dict:
        return add_deltas([*self.segments, InfoSnapshot.take(self.client).minus(self._start)])


def run(cfg: FleetConfig, fleet: Fleet, workdir: Path) -> dict:
    """Run the scenario; returns the report (``report["ok"]``: every invariant held)."""
    from campaigns.campaign import CampaignStore

    home = workdir / "home"
    report: dict = {"config": asdict(cfg), "machine": _machine(), "load_average": {"start": os.getloadavg()}}
    fleet.start_redis()
    client = fleet.client()
    batches = make_batches(cfg, workdir / "data")
    submitter = Submitter(cfg, home, fleet.url)
    # The benchmark's own reads (progress, the mid-run sweep calls) are counted and left out of the run's figures.
    store, own_commands = counting_store(fleet.url, home)
    rusage0 = resource.getrusage(resource.RUSAGE_SELF)

    # ---- enqueue before the workers start (the backlog) -------------------------------------------------------
    preload_n = int(cfg.jobs * cfg.preload)
    before = InfoSnapshot.take(client)
    t0 = time.time()
    split = 0
    while split < len(batches) and len(submitter.ids) < preload_n:
        submitter(batches[split])
        split += 1
    enqueue_s = time.time() - t0
    after = InfoSnapshot.take(client)
    pre = after.minus(before)
    n_pre = len(submitter.ids)
    report["enqueue"] = {
        "jobs": n_pre, "batches": split, "seconds": round(enqueue_s, 2),
        "jobs_per_s": round(n_pre / enqueue_s, 1) if enqueue_s else None,
        "commands_per_job": round(pre["commands"] / max(n_pre, 1), 1),
        "bytes_in_per_job": round(pre["net_in"] / max(n_pre, 1)),
        "bytes_out_per_job": round(pre["net_out"] / max(n_pre, 1)),
        "redis_cpu_ms_per_job": round(1000 * pre["cpu_s"] / max(n_pre, 1), 3),
        "memory_per_1000_queued_bytes": round(pre["used_memory"] / max(n_pre, 1) * 1000),
        "top_commands_per_job": _top(pre["by_command"], n_pre),
    }
    logger.info("enqueued %d jobs in %d calls in %.1f s; starting %d workers", n_pre, split, enqueue_s, cfg.workers)

    # ---- the fleet --------------------------------------------------------------------------------------------
    recorder = Recorder(fleet)
    started = time.time()
    runs = [fleet.start_worker(f"gpu{i}@fleet") for i in range(cfg.workers)]
    fleet.wait_ready(runs, timeout_s=max(120.0, 6.0 * cfg.workers))
    ready_s = time.time() - started
    fleet.sample_cpu()
    startup_cpu = fleet.worker_cpu_seconds()
    worker_cpu_ready = startup_cpu
    logger.info("%d workers ready in %.1f s (%.1f CPU-s)", cfg.workers, ready_s, startup_cpu)
    report["workers_start"] = {"seconds": round(ready_s, 1), "cpu_s": round(startup_cpu, 1)}

    feeder = Feeder(submitter, batches[split:], cfg.feed_s)
    feeder.start()
    faults = {"worker_kills": [], "redis": []}
    memory_sample, sweeps_midrun = None, []
    last_log = last_sample = last_sweep = time.monotonic()
    deadline = time.monotonic() + cfg.timeout_s
    pending_restarts: list[tuple[float, str]] = []
    kill_wait_since = None
    done_at = None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = time.monotonic()
        if now - last_sample >= 1.0:
            recorder.sample()
            last_sample = now
        try:
            counts = store.status_counts()
        except Exception:  # noqa: BLE001 - Redis down (the fault scenario)
            continue
        final = sum(counts[s] for s in ("completed", "failed", "skipped", "cancelled"))
        share = counts["completed"] / cfg.jobs
        if now - last_log >= 10:
            logger.info("%s; load %.1f", ", ".join(f"{k} {v}" for k, v in counts.items() if v), os.getloadavg()[0])
            last_log = now
        if memory_sample is None and share >= 0.5:
            memory_sample = _memory(fleet)
        feeding = feeder.is_alive()
        if now - last_sweep >= 30 and counts["completed"] < cfg.jobs:
            sweeps_midrun.append(_sweep_probe(fleet, home, cfg.stale_s, counts["processing"], own_commands))
            last_sweep = now
        # ---- faults, in the middle of the run (the feed held while Redis is down)
        if cfg.faults:
            if not faults["worker_kills"] and share >= cfg.kill_at:
                kill_wait_since = kill_wait_since or now
                faults["worker_kills"] = _kill_workers(fleet, store, cfg.kill_workers, force=now - kill_wait_since > 30)
                if faults["worker_kills"] and cfg.restart_after_s >= 0:
                    pending_restarts = [(time.monotonic() + cfg.restart_after_s, k["worker"])
                                        for k in faults["worker_kills"]]
            if not faults["redis"] and share >= cfg.redis_kill_at and (faults["worker_kills"] or not cfg.kill_workers):
                feeder.hold()
                recorder.close_segment()
                killed = fleet.kill_redis()
                time.sleep(cfg.redis_down_s)
                back = fleet.restart_redis()
                recorder.open_segment()
                feeder.release()
                client = fleet.client()
                faults["redis"].append({"killed_at": killed, "back_at": back, "down_s": round(back - killed, 2)})
                logger.warning("redis-server killed (kill -9) and restarted on its AOF: down %.2f s", back - killed)
        for due, name in list(pending_restarts):
            if time.monotonic() >= due:
                fleet.start_worker(name)
                pending_restarts.remove((due, name))
                logger.warning("worker %s restarted", name)
        if feeder.error is not None:
            raise RuntimeError(f"enqueue failed: {feeder.error!r}") from feeder.error
        if not feeding and not pending_restarts and final >= len(submitter.ids) and counts["processing"] == 0:
            done_at = time.time()
            break
    feeder.stop()
    main_end = time.time()
    finished = done_at is not None
    if not finished:
        logger.error("not finished after %.0f s", cfg.timeout_s)

    # ---- the end of the main phase: leftovers, Redis figures, memory -------------------------------------------
    leftover = _drain(store, 15.0 if finished else 0.0)
    recorder.sample()
    main = subtract(recorder.total(), own_commands)
    worker_cpu_main = fleet.worker_cpu_seconds() - worker_cpu_ready
    memory_end = _memory(fleet)
    key_memory = _key_memory(fleet.client(), submitter.ids)
    used_memory = InfoSnapshot.take(fleet.client()).used_memory
    report["load_average"]["main_end"] = os.getloadavg()

    # ---- idle and steady-state costs of a worker -----------------------------------------------------------------
    idle = _window(fleet, cfg.idle_s) if cfg.idle_s > 0 else None
    steady = _steady(cfg, fleet, submitter, store) if cfg.steady_s > 0 and finished else None

    # ---- records, then the quiet Redis: sweep cost, capacity --------------------------------------------------------
    rank = {p: i for i, p in enumerate(PRIORITIES)}
    main_ids = list(submitter.ids[: len(submitter.ids) - (steady or {}).get("jobs", 0)])
    jobs = {}
    for job in store.get_many(main_ids):
        jobs[job.id] = analysis.job_facts(job, store.history(job.id), rank)
    campaigns_store = CampaignStore(home)
    campaigns = {}
    for cid in sorted({b.campaign for b in batches}):
        try:
            c = campaigns_store.get(cid)
            campaigns[cid] = {"current_step": c.current_step, "job_ids": list(c.job_ids)}
        except Exception:  # noqa: BLE001 - reported as a campaign problem
            pass
    fleet.stop_workers()
    stopped_at = time.time()
    sweep_quiet = _sweep_quiet(fleet, home, cfg.stale_s)
    capacity = redis_capacity(fleet.admin_url, cfg.capacity_s) if cfg.capacity_s > 0 else None
    rusage1 = resource.getrusage(resource.RUSAGE_SELF)
    bench_cpu = (rusage1.ru_utime + rusage1.ru_stime) - (rusage0.ru_utime + rusage0.ru_stime)

    # ---- analysis ------------------------------------------------------------------------------------------------
    logs = [analysis.parse_worker_log(r.log_path.read_text(errors="replace"), r.name, r.incarnation)
            for r in fleet.runs]
    engine_runs = analysis.read_runs(workdir / "events")
    killed_at = {r.pid: r.killed_at for r in fleet.runs if r.killed_at is not None}
    from jobs.queues import DEFAULT_DEFER_DELAY_S

    tolerance = DEFAULT_DEFER_DELAY_S + 0.5
    # After a fault, until the sweep has sent every message that died with it (stale window + a sweep round):
    # settings.sweep_interval_s is per worker; with many workers one of them sweeps within a second or two.
    settle = cfg.stale_s + 5.0
    recovery = [(k["killed_at"], k["killed_at"] + settle) for k in faults["worker_kills"]]
    recovery += [(f["killed_at"], f["back_at"] + settle) for f in faults["redis"]]
    eps = analysis.episodes(jobs, logs)
    ends = {(r.name, r.incarnation): min(r.killed_at or main_end, main_end) for r in fleet.runs}
    n = len(jobs)
    claims = [t for j in jobs.values() for t in j.transitions if t.target == "processing"]
    completes = [t.at for j in jobs.values() for t in j.transitions if t.target == "completed"]
    first_claim = min((t.at for t in claims), default=started)
    span = (max(completes) - first_claim) if completes else 0.0
    throughput = 60 * len(completes) / span if span > 0 else 0.0
    cpu_total = worker_cpu_main + main["cpu_s"] + bench_cpu
    report.update({
        "finished": finished,
        "endings": analysis.endings(jobs, main_ids, engine_runs, campaigns, cfg.steps),
        "campaign_overlap": {
            "engine": analysis.overlaps(analysis.engine_intervals(engine_runs, jobs, killed_at, stopped_at)),
            "store": analysis.overlaps(analysis.store_intervals(jobs)),
        },
        "priority": {"raw": analysis.priority_violations(eps, 0.0, recovery),
                     "beyond_tolerance": analysis.priority_violations(eps, tolerance, recovery),
                     "recovery_windows": [[round(a, 3), round(b, 3)] for a, b in recovery]},
        "latency": analysis.dispatch_latencies(eps),
        "worker_time": analysis.worker_time(logs, ends),
        "throughput": {
            "jobs": len(completes), "seconds": round(span, 1), "jobs_per_min": round(throughput, 1),
            "ideal_jobs_per_min": round(60 * cfg.workers / cfg.job_s, 1),
            "cpu_s_per_job": round(cpu_total / max(n, 1), 4),
            "cpu_bound_jobs_per_min": round(60 * (os.cpu_count() or 1) / (cpu_total / max(n, 1)), 1)
            if cpu_total else None,
            "cpu_s": {"workers": round(worker_cpu_main, 1), "redis": round(main["cpu_s"], 1),
                      "bench_process": round(bench_cpu, 1)},
        },
        "redis": {
            "commands_per_job": round(main["commands"] / max(n, 1), 1),
            "bytes_in_per_job": round(main["net_in"] / max(n, 1)),
            "bytes_out_per_job": round(main["net_out"] / max(n, 1)),
            "cpu_ms_per_job": round(1000 * main["cpu_s"] / max(n, 1), 3),
            "exec_usec_per_job": round(sum(main["usec_by_command"].values()) / max(n, 1), 1),
            "top_commands_per_job": _top(main["by_command"], n),
            "used_memory_end_bytes": used_memory,
            "memory_per_1000_completed_bytes": round(key_memory["per_job_bytes"] * 1000),
            "key_memory": key_memory,
            "commands_per_s": round(main["commands"] / main["seconds"], 1) if main["seconds"] else None,
            "segments": len(recorder.segments) + 1,
        },
        "idle_worker": idle and _per(idle, cfg.workers),
        "steady": steady,
        "sweep": {"quiet": sweep_quiet, "midrun": sweeps_midrun},
        "capacity": capacity,
        "memory": {"at_half": memory_sample, "at_end": memory_end},
        "leftover_messages": leftover,
        "faults": faults if cfg.faults else None,
    })
    if cfg.faults:
        report["recovery"] = _recovery(faults, jobs, engine_runs, logs)
    report["load_average"]["end"] = os.getloadavg()
    report["ok"] = _ok(report)
    return report


def _ok(report: dict) -> bool:
    checks = [report["finished"], report["endings"]["ok"], report["campaign_overlap"]["engine"]["count"] == 0,
              report["campaign_overlap"]["store"]["count"] == 0, report["priority"]["beyond_tolerance"]["count"] == 0]
    if report.get("recovery") is not None:
        checks.append(report["recovery"]["ok"])
    return all(checks)


# ----------------------------------------------------------------------------------------------- faults


def _kill_workers(fleet: Fleet, store, count: int, force: bool = False) -> list[dict]:
    """``kill -9`` the process groups of ``count`` workers: half of them while they train a job, the others while
    they do anything else (idle, or handling a delivery that parks its job). Returns [] (to try again a little
    later) until enough workers are training, unless ``force``."""
    from jobs.job import JobStatus

    busy = {}
    for job in store.list(status=JobStatus.PROCESSING.value):
        runtime = store.runtime(job.id)
        if runtime.worker and (job.progress or {}).get("step", 0) >= 1:
            busy.setdefault(runtime.worker, job.id)
    live = {r.name: r for r in fleet.live_runs()}
    training = [name for name in sorted(busy) if name in live]
    wanted = count - count // 2
    if len(training) < wanted and not force:
        return []
    chosen = training[:wanted]
    others = [name for name in sorted(live, key=lambda n: int(n[3:].split("@")[0])) if name not in busy]
    chosen += others[:count - len(chosen)]
    kills = []
    for name in chosen:
        run = live[name]
        at = fleet.kill_worker(run)
        kills.append({"worker": name, "incarnation": run.incarnation, "pid": run.pid, "job": busy.get(name),
                      "killed_at": at})
        logger.warning("kill -9 worker %s (pid %d)%s", name, run.pid,
                       f" while it trains {busy[name]}" if name in busy else "")
    return kills


def _recovery(faults: dict, jobs: dict, runs: list, logs: list) -> dict:
    """What the faults cost, and that it was recovered: the job a killed worker trained comes back with one more
    attempt (the sweep takes it over) and completes once; a message a killed worker held is put back by kombu or the
    sweep; the jobs running across the Redis restart."""
    out = []
    held_by = {(log.worker, log.incarnation): next((t for t in reversed(log.tasks) if t.done is None), None)
               for log in logs}
    for kill in faults["worker_kills"]:
        held = held_by.get((kill["worker"], kill["incarnation"]))
        job_id = kill["job"] or (held.job if held is not None else None)
        entry = {"worker": kill["worker"], "was": "training" if kill["job"] else
                 ("holding a message" if held is not None else "waiting for a message"), "job": job_id}
        job = jobs.get(job_id) if job_id else None
        if job is None:
            out.append({**entry, "ok": job_id is None})  # nothing in hand: nothing to recover
            continue
        ended = next((t for t in job.transitions if t.target == "completed"), None)
        if kill["job"] and ended is not None and ended.at < kill["killed_at"]:
            # chosen while it trained, but it completed between the choice and the kill: nothing to recover
            out.append({**entry, "was": "done (its job completed before the kill landed)", "status": job.status,
                        "attempts": job.attempts, "ok": job.attempts == 1})
            continue
        after = [t for t in job.transitions if t.at >= kill["killed_at"]]
        requeue = next((t for t in after if t.target == "queued"), None)
        claim = next((t for t in after if t.target == "processing"), None)
        resumed = [r for r in runs if r.job == job.id and r.start >= kill["killed_at"]]
        completed_once = job.status == "completed" and sum(1 for t in job.transitions if t.target == "completed") == 1
        ok = completed_once and (not kill["job"] or (requeue is not None and job.attempts >= 2))
        out.append({**entry, "status": job.status, "attempts": job.attempts,
                    "requeued_after_s": round(requeue.at - kill["killed_at"], 2) if requeue else None,
                    "requeued_by": requeue.reason if requeue else None,
                    "claimed_again_after_s": round(claim.at - kill["killed_at"], 2) if claim else None,
                    "resumed_from_step": resumed[0].start_step if resumed else None,
                    "history": [t.target for t in job.transitions], "ok": ok})
    redis_hit = {}
    for fault in faults["redis"]:
        spanned = [j for j in jobs.values()
                   if any(t.target == "processing" and t.at < fault["killed_at"] for t in j.transitions)
                   and any(t.source == "processing" and t.at > fault["killed_at"] for t in j.transitions)]
        redis_hit = {**fault, "jobs_running_at_kill": len(spanned),
                     "their_attempts": analysis.histogram(j.attempts for j in spanned),
                     "taken_over_after": sum(1 for j in spanned if any("lost" in t.reason for t in j.transitions
                                                                        if t.at > fault["killed_at"]))}
    return {"killed_workers": out, "redis": redis_hit,
            "ok": len(out) == len(faults["worker_kills"]) and bool(out) and all(k["ok"] for k in out)
            and bool(faults["redis"])}


# ------------------------------------------------------------------------------------------- measurements


def _machine() -> dict:
    return {"system": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _top(by_command: dict[str, int], n: int, k: int = 12) -> dict[str, float]:
    top = sorted(by_command.items(), key=lambda kv: -kv[1])[:k]
    return {name: round(calls / max(n, 1), 2) for name, calls in top}


def _memory(fleet: Fleet) -> dict:
    per = [r.memory() for r in fleet.live_runs()]
    per = [p for p in per if p["processes"]]
    if not per:
        return {}
    return {"workers": len(per), "pss_mib_mean": round(sum(p["pss"] for p in per) / len(per) / 1024, 1),
            "pss_mib_max": round(max(p["pss"] for p in per) / 1024, 1),
            "rss_mib_mean": round(sum(p["rss"] for p in per) / len(per) / 1024, 1),
            "pss_mib_total": round(sum(p["pss"] for p in per) / 1024, 1)}


def _key_memory(client, job_ids: list[str]) -> dict:
    """Redis memory by kind of key (MEMORY USAGE of every key; job ids in key names replaced by ``<id>``)."""
    ids = set(job_ids)
    kinds: dict[str, list[int]] = {}
    keys = [k.decode() for k in client.scan_iter(count=1000)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = pipe.execute()
    for key, size in zip(keys, sizes):
        kind = key
        for token in _id_tokens(key):
            if token in ids:
                kind = key.replace(token, "<id>")
                break
        kind = _generic(kind)
        kinds.setdefault(kind, [0, 0])
        kinds[kind][0] += 1
        kinds[kind][1] += size or 0
    per_job = sum(size for kind, (count, size) in kinds.items() if "<id>" in kind) / max(len(ids), 1)
    shared = {k: v for k, v in kinds.items() if "<id>" not in k}
    return {"per_job_bytes": round(per_job),
            "per_job_kinds": {k: {"keys": c, "bytes_per_job": round(s / max(len(ids), 1))}
                              for k, (c, s) in sorted(kinds.items()) if "<id>" in k},
            "shared_keys": {k: {"keys": c, "bytes": s}
                            for k, (c, s) in sorted(shared.items(), key=lambda kv: -kv[1][1])[:15]},
            "total_bytes": sum(s for _, s in kinds.values())}


def _id_tokens(key: str) -> list[str]:
    parts = [key]
    for sep in (":", "-meta-", "task-meta-"):
        parts = [p for part in parts for p in part.split(sep)]
    return parts


def _generic(kind: str) -> str:
    """Per-campaign and per-dataset keys grouped: ``guild:campaign:<name>:lock``, ``guild:dataset:<sha>``."""
    parts = kind.split(":")
    out = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "campaign":
            out.append("<campaign>")
        elif i > 0 and parts[i - 1] == "dataset":
            out.append("<sha>")
        else:
            out.append(part)
    return ":".join(out)


def _per(window: dict, workers: int) -> dict:
    """A window's rates per worker."""
    out = {k: round(v / workers, 3) for k, v in window.items() if isinstance(v, float)}
    out["by_command_per_s"] = {k: round(v / workers, 3) for k, v in window["by_command_per_s"].items()}
    return out


def _drain(store, timeout_s: float) -> dict:
    """Wait (bounded) until no message waits in any queue; what is left (duplicates of finished jobs) is reported."""
    deadline = time.monotonic() + timeout_s
    counts = store.message_counts()
    while sum(counts.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        counts = store.message_counts()
    return counts


def _window(fleet: Fleet, seconds: float) -> dict:
    """Redis commands, bytes and CPU over ``seconds`` of the fleet doing nothing (every worker idle)."""
    client = fleet.client()
    a = InfoSnapshot.take(client)
    time.sleep(seconds)
    d = InfoSnapshot.take(client).minus(a)
    return {"commands_per_s": d["commands"] / d["seconds"], "bytes_in_per_s": d["net_in"] / d["seconds"],
            "bytes_out_per_s": d["net_out"] / d["seconds"], "redis_cpu_ms_per_s": 1000 * d["cpu_s"] / d["seconds"],
            "by_command_per_s": {k: round(v / d["seconds"], 2) for k, v in d["by_command"].items()}}


def _steady(cfg: FleetConfig, fleet: Fleet, submitter: Submitter, store) -> dict | None:
    """One long job per worker, each in a campaign of its own; Redis' cost per running job and second while they
    all train (heartbeats, lease renewals, progress events, sweeps; no job starts or ends in the window)."""
    from jobs.job import JobStatus

    steps = math.ceil((cfg.steady_s + 15) / cfg.step_s)
    ids = []
    for i in range(cfg.workers):
        path = Path(submitter.settings.guild_home).parent / "steady" / f"s{i:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompt": f"steady {i}?", "response": "yes"}) + "\n")
        ids += submitter(Batch(f"steady-{i:03d}", "normal", [str(path)]), sets={"max_steps": str(steps),
                                                                                  "save_steps": str(steps)})
    try:
        from tests.services import wait_until

        wait_until(lambda: all(j.status == JobStatus.PROCESSING for j in store.get_many(ids)), 60, interval_s=0.5,
                   what="one steady job on every worker")
    except TimeoutError:
        logger.warning("steady phase skipped: not every worker took a job within 60 s")
        return {"jobs": len(ids), "measured": False}
    window = _window(fleet, cfg.steady_s)
    from tests.services import wait_until

    wait_until(lambda: all(j.status.value in ("completed", "failed") for j in store.get_many(ids)), 120,
               interval_s=0.5, what="the steady jobs to end")
    per_job = _per(window, cfg.workers)
    return {"jobs": len(ids), "measured": True, "seconds": cfg.steady_s, "per_running_job": per_job,
            "completed": sum(1 for j in store.get_many(ids) if j.status == JobStatus.COMPLETED)}


def _sweep_probe(fleet: Fleet, home: Path, stale_s: float, processing: int, own: dict[str, int]) -> dict:
    """One call of the sweep function, mid-run, on a client that counts what it sends (added to ``own``: the
    benchmark's extra sweeps are left out of the run's figures)."""
    from tasks.app import app
    from tasks.publish import CeleryPublisher
    from tasks.sweeper import sweep_once

    store, counter = counting_store(fleet.url, home)
    t = time.perf_counter()
    try:
        recovered = sweep_once(store, stale_s, CeleryPublisher(app, store))
    except Exception as exc:  # noqa: BLE001 - Redis restarting
        return {"error": str(exc)}
    seconds = time.perf_counter() - t
    for name, calls in counter.items():
        own[name] = own.get(name, 0) + calls
    return {"seconds": round(seconds, 4), "commands": sum(counter.values()), "processing": processing,
            "recovered": len(recovered), "by_command": dict(counter)}


def _sweep_quiet(fleet: Fleet, home: Path, stale_s: float, rounds: int = 20) -> dict:
    """The sweep function on the final store (every job done, no worker): time and exact commands (INFO)."""
    from jobs.store import JobStore
    from tasks.app import app
    from tasks.publish import CeleryPublisher
    from tasks.sweeper import sweep_once

    client = fleet.client()
    store = JobStore(client, home)
    publisher = CeleryPublisher(app, store)
    sweep_once(store, stale_s, publisher)  # scripts and connections warm
    times = []
    a = InfoSnapshot.take(client)
    for _ in range(rounds):
        t = time.perf_counter()
        sweep_once(store, stale_s, publisher)
        times.append(time.perf_counter() - t)
    d = InfoSnapshot.take(client).minus(a)
    return {"jobs_in_store": len(store.list()), "rounds": rounds,
            "seconds_median": round(sorted(times)[rounds // 2], 5),
            "commands_per_sweep": round(d["commands"] / rounds, 2), "by_command": d["by_command"]}


# --------------------------------------------------------------------------------------------------- output


def summary(report: dict) -> str:
    e, p, lat, t, r = report["endings"], report["priority"], report["latency"], report["throughput"], report["redis"]
    overlap = report["campaign_overlap"]
    cfg = report["config"]
    ok = lambda b: "ok" if b else "FAILED"  # noqa: E731
    lines = [
        f"fleet: {cfg['workers']} workers, {e['submitted']} jobs, {cfg['campaigns']} campaigns, "
        f"{cfg['steps']} steps x {cfg['step_s']} s; load average {report['load_average']['start'][0]:.1f} → "
        f"{report['load_average']['end'][0]:.1f}" + (" (faults)" if cfg["faults"] else ""),
        f"  every job ends exactly once: {ok(e['ok'])} (completed {e['completed']}/{e['submitted']}, lost "
        f"{len(e['lost'])}, completed twice {len(e['completed_twice'])}, trained to the end twice "
        f"{len(e['trained_to_the_end_twice'])}, campaign problems {len(e['campaign_problems'])}; attempts "
        f"{e['attempts']})",
        f"  one campaign, one worker: {ok(overlap['engine']['count'] == 0 and overlap['store']['count'] == 0)} "
        f"(engine overlaps {overlap['engine']['count']}, store overlaps {overlap['store']['count']})",
        f"  strict priority: {ok(p['beyond_tolerance']['count'] == 0)} ({p['beyond_tolerance']['count']} claims "
        f"past a higher job eligible > {p['beyond_tolerance']['tolerance_s']} s; {p['raw']['count']} at any age, "
        f"longest {p['raw']['max_waited_s']} s; {p['raw']['claims_checked']} claims checked; "
        f"{p['beyond_tolerance']['during_recovery']} while recovering from a fault)",
        f"  dispatch latency p50 {lat['dispatch_s'].get('p50')} s, p99 {lat['dispatch_s'].get('p99')} s; pick-up p50 "
        f"{lat['pickup_s'].get('p50')} s, p99 {lat['pickup_s'].get('p99')} s",
        f"  throughput {t['jobs_per_min']} jobs/min (ideal {t['ideal_jobs_per_min']}, CPU bound "
        f"{t['cpu_bound_jobs_per_min']}; {t['cpu_s_per_job']} CPU-s a job: {t['cpu_s']})",
        f"  worker time: {report['worker_time']['share']}",
        f"  Redis per job: {r['commands_per_job']} commands, {r['bytes_in_per_job']} B in, {r['bytes_out_per_job']} B "
        f"out, {r['cpu_ms_per_job']} ms CPU; {r['memory_per_1000_completed_bytes'] / 1e6:.2f} MB per 1,000 completed "
        f"jobs; enqueue {report['enqueue']['commands_per_job']} commands and "
        f"{report['enqueue']['memory_per_1000_queued_bytes'] / 1e6:.2f} MB per 1,000 queued",
    ]
    if report.get("steady") and report["steady"].get("measured"):
        s = report["steady"]["per_running_job"]
        lines.append(f"  a running job costs Redis {s['commands_per_s']} commands/s, {s['bytes_in_per_s']:.0f} B/s in, "
                     f"{s['bytes_out_per_s']:.0f} B/s out, {s['redis_cpu_ms_per_s']:.3f} ms CPU/s")
    if report.get("idle_worker"):
        i = report["idle_worker"]
        lines.append(f"  an idle worker costs Redis {i['commands_per_s']} commands/s")
    q = report["sweep"]["quiet"]
    mid = [(s.get("processing"), s.get("commands"), s.get("seconds")) for s in report["sweep"]["midrun"][:3]]
    lines.append(f"  sweep at {q['jobs_in_store']} jobs: {q['seconds_median'] * 1000:.2f} ms, "
                 f"{q['commands_per_sweep']} commands (mid-run, (processing, commands, s): {mid})")
    if report.get("capacity"):
        c = report["capacity"]
        lines.append(f"  this redis-server: {c}")
    m = report["memory"]["at_end"] or {}
    lines.append(f"  worker memory: PSS {m.get('pss_mib_mean')} MiB mean, {m.get('pss_mib_max')} max, "
                 f"{m.get('pss_mib_total')} MiB for {m.get('workers')} workers; leftover messages "
                 f"{report['leftover_messages']}")
    if report.get("recovery"):
        rec = report["recovery"]
        lines.append(f"  recovery: {ok(rec['ok'])}")
        for k in rec["killed_workers"]:
            lines.append(f"    kill -9 {k['worker']} {k['was']} {k.get('job') or ''}: {k.get('status', '')} "
                         f"attempts {k.get('attempts')}, requeued after {k.get('requeued_after_s')} s, claimed again "
                         f"after {k.get('claimed_again_after_s')} s, resumed from step {k.get('resumed_from_step')}")
        hit = rec["redis"]
        lines.append(f"    redis kill -9: down {hit.get('down_s')} s, {hit.get('jobs_running_at_kill')} "
                     f"jobs running, their attempts {hit.get('their_attempts')}, taken over "
                     f"{hit.get('taken_over_after')}")
    lines.append(f"  => {'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    d = FleetConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--jobs", type=int, default=d.jobs)
    ap.add_argument("--campaigns", type=int, default=d.campaigns)
    ap.add_argument("--steps", type=int, default=d.steps, help="steps per job")
    ap.add_argument("--step-s", type=float, default=d.step_s, help="seconds per stand-in step")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="files per enqueue call: 1..N")
    ap.add_argument("--preload", type=float, default=d.preload, help="share of jobs enqueued before workers start")
    ap.add_argument("--feed-s", type=float, default=d.feed_s, help="the rest arrives over this many seconds")
    ap.add_argument("--stale-s", type=float, default=d.stale_s, help="GUILD_HEARTBEAT_STALE_S of the workers")
    ap.add_argument("--faults", action="store_true", help="kill -9 workers and Redis mid-run")
    ap.add_argument("--kill-workers", type=int, default=d.kill_workers)
    ap.add_argument("--restart-after-s", type=float, default=d.restart_after_s,
                    help="killed workers come back after this many seconds (negative: never)")
    ap.add_argument("--idle-s", type=float, default=d.idle_s)
    ap.add_argument("--steady-s", type=float, default=d.steady_s)
    ap.add_argument("--capacity-s", type=float, default=d.capacity_s)
    ap.add_argument("--timeout-s", type=float, default=d.timeout_s)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", type=Path, default=None, help="where the figures go (default .bench/fleet[-faults].json)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh folder under .bench/")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, datasets, Redis' AOF)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("celery", "kombu", "jobs", "tasks", "campaigns", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = ("workers", "jobs", "campaigns", "steps", "step_s", "max_batch", "preload", "feed_s", "stale_s", "faults",
             "kill_workers", "restart_after_s", "idle_s", "steady_s", "capacity_s", "timeout_s", "seed")
    cfg = FleetConfig(**{k: getattr(args, k) for k in names})
    workdir = (args.workdir or REPO / ".bench" / f"fleet-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}").resolve()
    out = args.json or REPO / ".bench" / ("fleet-faults.json" if cfg.faults else "fleet.json")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GUILD_HOME": str(workdir / "home"), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "GUILD_ENGINE_FACTORY": "bench.fleet_engine:engine",
           "GUILD_FLEET_EVENTS": str(workdir / "events"), "GUILD_FLEET_STEP_S": str(cfg.step_s),
           "GUILD_HEARTBEAT_STALE_S": str(cfg.stale_s)}
    fleet = Fleet(workdir, env)
    # This process enqueues through the project's Celery app, which reads the broker URL once, at import.
    os.environ.update({"REDIS_URL": fleet.url, "GUILD_HOME": env["GUILD_HOME"]})
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report = None
    try:
        report = run(cfg, fleet, workdir)
    except KeyboardInterrupt:
        logger.error("interrupted; stopping every process")
    finally:
        fleet.stop()
    if report is None:
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(summary(report))
    print(f"figures: {out}; work folder: {workdir if args.keep else 'removed'}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
