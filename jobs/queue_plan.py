"""The queue plan (``jobs plan``, ``enqueue --plan``): queued jobs in the order workers take them, with ETAs."""

from __future__ import annotations

from typing import Any

from jobs.queues import PRIORITY_RANK


def build_plan(store, throughput_of, workers: int = 1, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{"jobs": [...], "totals": {...}}`` for every queued job, priority then age.

    Args:
        throughput_of: ``throughput_of(hero_id) -> tokens/s`` (the hero's measured figure).
        workers: jobs run this many at a time (cumulative ETA divides by it).
        extra: would-be jobs (``enqueue --plan``): each lands after every queued job of its priority.
    """
    records = store.queue_summaries()  # 10,000 jobs in two round trips
    for new in extra or []:
        rank = PRIORITY_RANK[new["priority"]]
        at = next((i for i, r in enumerate(records) if PRIORITY_RANK[r["priority"]] > rank), len(records))
        records.insert(at, new)
    jobs, cumulative = [], 0.0
    totals = {"jobs": 0, "num_examples": 0, "estimated_tokens": 0, "eta_s": 0.0}
    for rec in records:
        job_id = rec.pop("id")
        tokens = int(rec["estimated_tokens"] or 0)
        duration = tokens / max(throughput_of(rec["hero_id"]), 1e-9)
        cumulative += duration / max(workers, 1)
        jobs.append({"id": job_id, **rec, "estimated_duration_s": round(duration, 1), "eta_s": round(cumulative, 1)})
        totals["jobs"] += 1
        totals["num_examples"] += int(rec["num_examples"] or 0)
        totals["estimated_tokens"] += tokens
    totals["eta_s"] = round(cumulative, 1)
    return {"jobs": jobs, "totals": totals}


def hero_throughput(guild_home, gpu: bool = False):
    """A ``throughput_of`` reading each hero's ``throughput`` figure once."""
    from heroes.profile import load_hero

    cache: dict[str, float] = {}

    def throughput_of(hero_id: str) -> float:
        if hero_id not in cache:
            try:
                t = load_hero(hero_id, guild_home).throughput
                cache[hero_id] = float(t.get("gpu_tokens_per_sec" if gpu else "cpu_tokens_per_sec") or 1000.0)
            except Exception:  # noqa: BLE001 - an unknown hero still gets an estimate
                cache[hero_id] = 1000.0
        return cache[hero_id]

    return throughput_of


def plan_submission(settings, store, request, throughput_of) -> dict[str, Any]:
    """The plan as it would be after ``request`` (validated like a real submission); enqueues nothing."""
    from jobs.submit import check_files, check_request, plan_request

    check_request(request)
    target, _plan = plan_request(settings, request)
    extra = [{"id": f"(new) {f.path}", "priority": request.priority, "num_examples": f.num_examples,
              "estimated_tokens": f.estimated_tokens, "hero_id": target.hero.id, "campaign_id": target.name,
              "created_at": None, "new": True} for f in check_files(request.paths)]
    return build_plan(store, throughput_of, extra=extra)
