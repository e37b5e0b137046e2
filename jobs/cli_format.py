"""Formatting of job records for the CLIs (text tables, one-record views)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.job import Job
from jobs.job_plan import JobPlan
from jobs.waiting import Wait, clock_time


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_table(jobs: list[Job], waits: dict[str, Wait] | None = None) -> str:
    """One row per job; a parked job's row says what it waits for."""
    waits = waits or {}
    rows = [("ID", "STATUS", "PRIORITY", "CAMPAIGN", "ATTEMPTS", "STEP", "LOSS", "WAITING")]
    for j in jobs:
        step = j.progress.get("step") if j.progress else j.final_step
        loss = j.progress.get("loss") if j.progress else j.final_loss
        wait = waits.get(j.id)
        rows.append((j.id, j.status.value, j.priority, j.campaign_id, str(j.attempts), _fmt(step), _fmt(loss),
                     wait.describe() if wait else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def job_view(job: Job, plan: bool = False, wait: Wait | None = None) -> str:
    """One job's record as ``key: value`` lines (with what a parked job waits for), then (``plan``) what it
    trains."""
    lines = []
    for key, value in job.to_dict().items():
        if key in ("metadata", "artifacts", "plan", "truncation"):
            continue
        lines.append(f"{key + ':':18} {_fmt(value)}")
        if key == "status" and wait is not None:
            lines.append(f"{'waiting:':18} {wait.describe()} (since {clock_time(wait.since)})")
    meta = job.metadata or {}
    for key, value in (job.artifacts or {}).items():
        lines.append(f"{key + ':':18} {value}")
    for key in ("checkpoint", "source_path", "num_truncated", "num_dropped"):
        if meta.get(key) is not None:
            lines.append(f"{key + ':':18} {_fmt(meta[key])}")
    if plan and job.plan is not None:
        lines.append(plan_view(job.plan))
    return "\n".join(lines)


def plan_view(plan: JobPlan) -> str:
    """The frozen plan: hero, model, hash, locked block, then every config value with the layer that set it."""
    lines = ["plan (resolved at enqueue; what the worker trains):",
             f"  {'hero:':16} {plan.hero.id} ({plan.hero.source})",
             f"  {'model:':16} {plan.model_path}" + (f" (hub {plan.hub_name})" if plan.hub_name != plan.model_path
                                                      else ""),
             f"  {'config_hash:':16} {plan.config_hash}",
             f"  {'git_commit:':16} {_fmt(plan.git_commit)}",
             f"  {'resolved_at:':16} {plan.resolved_at}",
             "  locked: " + ", ".join(f"{k}={_fmt(v)}" for k, v in plan.locked.items())]
    if plan.sets:
        lines.append("  --set: " + " ".join(f"{k}={v}" for k, v in plan.sets.items()))
    flat = {**plan.config.flat(), **{f"queue.{k}": v for k, v in dataclasses.asdict(plan.queue).items()}}
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        source = plan.sources.get(key, "defaults")
        origin = plan.origins.get(source, "")
        where = source + (f" ({origin})" if origin and source != "defaults" else "")
        lines.append(f"  {key.ljust(width)}  {_fmt(value):>12}  {where}")
    return "\n".join(lines)
