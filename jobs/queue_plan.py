"""The queue plan (``jobs plan``, ``enqueue --plan``): queued jobs in the order workers take them, with ETAs that
come from what is true now, and say "unknown" rather than guess.

An ETA is planned from:

* **the workers**: the live ones of the store's registry (a sweep within ``GUILD_HEARTBEAT_STALE_S``), less the
  paused ones. None left: no ETA at all ("not before `jobs resume`" / "not before a worker starts");
* **what runs**: a worker running a job is busy for that job's remaining time, from its live progress (the engine's
  own ETA, as of its last beat), and its campaign with it;
* **campaign order**: a job starts only after the job before it in its campaign ends, whichever worker runs it;
  meanwhile a worker takes the next job it may start (as workers do: a blocked job is parked);
* **retry backoff**: a job parked in its backoff does not start before it ends (one requeued a moment ago and not
  yet delivered is planned as if it could start);
* **what each job trains**: the tokens all its steps train, counted at enqueue after truncation at ``max_length``
  (``Job.workload``; jobs enqueued before it: the character estimate, labelled);
* **measured speeds**: per hero and kind of device, the median tokens/s and fixed cost per job of the newest
  completed jobs (:mod:`jobs.speeds`); without one, the hero profile's figure, labelled as such; without that,
  unknown, and so is every ETA that depends on it.

The schedule is simulated job by job: the earliest-free worker takes the first job, in queue order, that may start
then. Times are seconds from now.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from jobs.queues import PRIORITY_RANK
from jobs.speeds import Speed, device_kind, measured_speed, profile_speed


@dataclass
class _Worker:
    name: str
    kind: str
    free_at: float | None  # seconds from now; None: unknown (it runs a job whose end is unknown)


def build_plan(store, settings, now: float | None = None, extra: list[dict[str, Any]] | None = None,
               speed_of=None) -> dict[str, Any]:
    """The plan of every queued job (and of ``extra`` would-be jobs), with the workers, running jobs and speeds.

    Args:
        store: the job store.
        settings: for the stale window (which workers are live) and $GUILD_HOME (hero profiles).
        now: epoch seconds (default: the wall clock).
        extra: would-be jobs (``enqueue --plan``), each like a queue summary: they land after every queued job of
            their priority.
        speed_of: ``speed_of(hero_id, kind) -> Speed``; default :func:`speeds_from` on ``store``.

    Returns:
        ``{"jobs": [...], "running": [...], "workers": {...}, "speeds": [...], "totals": {...}}``; every time is in
        seconds from now, None when unknown.
    """
    now = time.time() if now is None else now
    speed_of = speed_of or speeds_from(store, settings.guild_home)
    records = store.queue_summaries()
    for new in extra or []:
        rank = PRIORITY_RANK[new["priority"]]
        at = next((i for i, r in enumerate(records) if PRIORITY_RANK[r["priority"]] > rank), len(records))
        records.insert(at, new)
    waits = store.waiting()  # parked jobs only: a handful, where reading every queued job's runtime would be 10,000

    live = store.live_workers(settings.heartbeat_stale_s)
    paused = sorted(store.paused_workers() & set(live))
    workers = {name: _Worker(name, device_kind(name), 0.0) for name in live if name not in paused}
    campaign_free: dict[str, float | None] = {}  # campaign → seconds from now its running job ends (None: unknown)
    last_of_campaign: dict[str, str] = {}
    running = []
    for job in store.list(status="processing"):
        worker = store.runtime(job.id).worker
        left = remaining_s(job, now, speed_of(job.hero_id, device_kind(worker)))
        progress = job.progress or {}
        running.append({"id": job.id, "worker": worker, "campaign_id": job.campaign_id, "step": progress.get("step"),
                        "total_steps": progress.get("total_steps"), "remaining_s": _round(left)})
        if worker in workers:
            workers[worker].free_at = left
        campaign_free[job.campaign_id] = left
        last_of_campaign[job.campaign_id] = job.id

    jobs = [_row(rec, waits.get(rec["id"]), now) for rec in records]
    for row in jobs:  # campaign order: each job waits for the one before it in its campaign
        row["after"] = last_of_campaign.get(row["campaign_id"])
        last_of_campaign[row["campaign_id"]] = row["id"]
    if workers:
        _simulate(jobs, list(workers.values()), campaign_free, speed_of)
    kinds = sorted({(j["hero_id"], w.kind) for j in jobs for w in workers.values()})
    totals = _totals(jobs, workers, paused, live)
    return {"jobs": jobs, "running": running, "totals": totals,
            "workers": {"live": live, "paused": paused, "planned_on": sorted(workers)},
            "speeds": [{"hero_id": h, "device": k, **speed_of(h, k).to_dict()} for h, k in kinds]}


def speeds_from(store, guild_home):
    """``speed_of(hero_id, kind)``: the measured median, else the hero profile's figure (labelled), else unknown."""
    from heroes.profile import load_hero

    cache: dict[tuple[str, str], Speed] = {}

    def speed_of(hero_id: str, kind: str) -> Speed:
        if (hero_id, kind) not in cache:
            speed = measured_speed(store.speed_samples(hero_id, kind))
            if speed is None:
                try:
                    hero = load_hero(hero_id, guild_home)
                    speed = profile_speed(hero.throughput, kind, f"{hero.source}")
                except Exception:  # noqa: BLE001 - an unknown hero has no figure: unknown, not a guess
                    speed = None
            cache[(hero_id, kind)] = speed or Speed(None)
        return cache[(hero_id, kind)]

    return speed_of


def remaining_s(job, now: float, speed: Speed) -> float | None:
    """How long a running job still needs: its live ETA as of its last beat; before its first step, its planned
    duration; None when neither is known."""
    progress = job.progress or {}
    if progress.get("eta_s") is not None and progress.get("updated_at"):
        return max(0.0, float(progress["eta_s"]) - (now - float(progress["updated_at"])))
    return speed.duration_s(_tokens(job.workload, job.estimated_tokens)[0])


def _row(rec: dict[str, Any], wait, now: float) -> dict[str, Any]:
    tokens, basis = _tokens(rec.get("workload"), rec.get("estimated_tokens"))
    retry_at = wait.until if wait is not None else None
    truncation = ((rec.get("workload") or {}).get("truncation") or {})
    return {"id": rec["id"], "priority": rec["priority"], "campaign_id": rec["campaign_id"], "hero_id": rec["hero_id"],
            "num_examples": int(rec.get("num_examples") or 0), "train_tokens": tokens, "tokens_basis": basis,
            "truncation": truncation.get("message") if truncation.get("num_over") else None,
            "waiting": wait.describe() if wait is not None else None,
            "not_before_s": max(0.0, retry_at - now) if retry_at and retry_at > now else 0.0,
            "new": bool(rec.get("new")), "duplicate_of": rec.get("duplicate_of"),
            "start_s": None, "duration_s": None, "eta_s": None, "worker": None}


def _tokens(workload: dict[str, Any] | None, estimated: int | None) -> tuple[int, str]:
    """The tokens a job trains and what the figure is: counted after truncation, or the character estimate."""
    if workload and workload.get("train_tokens") is not None:
        return int(workload["train_tokens"]), "counted" if workload.get("counted") else "estimated (no tokenizer)"
    return int(estimated or 0), "estimated from characters (enqueued before token counts)"


def _simulate(jobs: list[dict[str, Any]], workers: list[_Worker], campaign_free: dict[str, float | None],
              speed_of) -> None:
    """Fill in start_s, duration_s, eta_s and worker of each job (None where unknown)."""
    by_campaign: dict[str, deque[int]] = {}
    for index, row in enumerate(jobs):
        by_campaign.setdefault(row["campaign_id"], deque()).append(index)
    heads = [(q[0], c) for c, q in by_campaign.items()]  # the first unplanned job of each campaign, by queue index
    heapq.heapify(heads)
    while heads:
        known = [w for w in workers if w.free_at is not None]
        if not known:
            return  # every worker runs something of unknown length: the rest is unknown
        worker = min(known, key=lambda w: (w.free_at, w.name))
        now_s, aside, chosen, earliest = worker.free_at, [], None, None
        while heads:
            index, campaign = heapq.heappop(heads)
            ready = _ready_at(jobs[index], campaign_free.get(campaign, 0.0))
            if ready is not None and ready <= now_s:
                chosen = (index, campaign)
                break
            aside.append((index, campaign))
            if ready is not None:
                earliest = ready if earliest is None else min(earliest, ready)
        for item in aside:
            heapq.heappush(heads, item)
        if chosen is None:
            # Nothing may start on this worker now: it idles until the first job may, or is out of the plan.
            worker.free_at = earliest
            continue
        index, campaign = chosen
        row = jobs[index]
        speed = speed_of(row["hero_id"], worker.kind)
        duration = speed.duration_s(row["train_tokens"])
        end = None if duration is None else now_s + duration
        row.update(start_s=_round(now_s), duration_s=_round(duration), eta_s=_round(end), worker=worker.name)
        worker.free_at = end
        campaign_free[campaign] = end
        queue = by_campaign[campaign]
        queue.popleft()
        if queue:
            heapq.heappush(heads, (queue[0], campaign))


def _ready_at(row: dict[str, Any], campaign_free_s: float | None) -> float | None:
    """When a job may start: after its campaign's current job and its backoff; None when unknown."""
    if campaign_free_s is None:
        return None
    return max(campaign_free_s, row["not_before_s"])


def _totals(jobs: list[dict[str, Any]], workers: dict[str, _Worker], paused: list[str], live: list[str]
            ) -> dict[str, Any]:
    totals: dict[str, Any] = {"jobs": len(jobs), "num_examples": sum(j["num_examples"] for j in jobs),
                              "train_tokens": sum(j["train_tokens"] for j in jobs), "eta_s": None, "note": ""}
    if not jobs:
        totals.update(eta_s=0.0, note="nothing queued")
    elif not live:
        totals["note"] = "no worker online: nothing starts before one does (make worker GPU=N)"
    elif not workers:
        totals["note"] = "every worker is paused: nothing starts before `python -m jobs resume`"
    elif any(j["eta_s"] is None for j in jobs):
        unknown = sum(1 for j in jobs if j["eta_s"] is None)
        totals["note"] = f"{unknown} job(s) without an ETA: no measured speed for their hero on these workers yet"
    else:
        totals["eta_s"] = max(j["eta_s"] for j in jobs)
    return totals


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def plan_submission(settings, store, request, now: float | None = None, speed_of=None) -> dict[str, Any]:
    """The plan as it would be after ``request`` (validated like a real submission); enqueues nothing. A file the
    real enqueue would refuse as a duplicate is marked (``duplicate_of``) and left out of the schedule."""
    from jobs.submit import check_files, check_request, count_workloads, duplicates, plan_request

    check_request(request)
    target, plan = plan_request(settings, request)
    files = check_files(request.paths)
    refused = duplicates(store, files, request.force)
    count_workloads(files, plan)
    extra = [{"id": f"(new) {f.path}", "priority": request.priority, "num_examples": f.num_examples,
              "estimated_tokens": f.estimated_tokens, "hero_id": target.hero.id, "campaign_id": target.name,
              "created_at": None, "workload": f.workload.to_dict(), "new": True, "duplicate_of": refused.get(f.path)}
             for f in files]
    result = build_plan(store, settings, now=now, extra=[e for e in extra if not e["duplicate_of"]],
                        speed_of=speed_of)
    result["refused"] = [{"path": f.path, "why": refused[f.path]} for f in files if f.path in refused]
    return result
