"""Formatting of job records for the CLIs (text tables, one-record views)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jobs.job import Job
from jobs.job_plan import JobPlan


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_table(jobs: list[Job]) -> str:
    rows = [("ID", "STATUS", "PRIORITY", "CAMPAIGN", "ATTEMPTS", "STEP", "LOSS")]
    for j in jobs:
        step = j.progress.get("step") if j.progress else j.final_step
        loss = j.progress.get("loss") if j.progress else j.final_loss
        rows.append((j.id, j.status.value, j.priority, j.campaign_id, str(j.attempts), _fmt(step), _fmt(loss)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def job_view(job: Job, plan: bool = False) -> str:
    """One job's record as ``key: value`` lines, then (``plan``) what it trains."""
    lines = []
    for key, value in job.to_dict().items():
        if key in ("metadata", "artifacts", "plan"):
            continue
        lines.append(f"{key + ':':18} {_fmt(value)}")
    meta = job.metadata or {}
    for key, value in (job.artifacts or {}).items():
        lines.append(f"{key + ':':18} {value}")
    for key in ("checkpoint", "source_path", "num_truncated", "num_dropped"):
        if meta.get(key) is not None:
            lines.append(f"{key + ':':18} {_fmt(meta[key])}")
    lines += _eval_lines(meta)
    if plan and job.plan is not None:
        lines.append(plan_view(job.plan))
    return "\n".join(lines)


def _eval_lines(meta: dict[str, Any]) -> list[str]:
    """The campaign eval set the job evaluated on and its figures at each evaluation (campaigns.eval_set)."""
    eval_set = meta.get("eval_set")
    if not eval_set:
        return []
    lines = [f"{'eval_set:':18} {str(eval_set.get('sha256'))[:12]} {eval_set.get('source')} "
             f"({eval_set.get('num_examples')} examples, max_length {eval_set.get('max_length')}, "
             f"{eval_set.get('num_probes', 0)} probes)"]
    points = meta.get("eval_history") or []
    if points:
        lines.append(f"{'eval_points:':18} " + " · ".join(f"step {p['step']} {p['loss']:.4f} ({p['seconds']:.2f} s)"
                                                          for p in points[-12:]))
        lines.append(f"{'eval_tokens:':18} {points[-1]['num_loss_tokens']} loss tokens over "
                     f"{points[-1]['num_examples']} examples at every evaluation")
    return lines


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
