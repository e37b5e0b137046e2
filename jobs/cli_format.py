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
        if key == "workload":
            lines += _workload_lines(value)
            continue
        lines.append(f"{key + ':':18} {_fmt(value)}")
        if key == "status" and wait is not None:
            lines.append(f"{'waiting:':18} {wait.describe()} (since {clock_time(wait.since)})")
    meta = job.metadata or {}
    for key, value in (job.artifacts or {}).items():
        lines.append(f"{key + ':':18} {value}")
    for key in ("checkpoint", "source_path", "num_truncated", "num_dropped", "attention", "loss_kernel"):
        if meta.get(key) is not None:
            lines.append(f"{key + ':':18} {_fmt(meta[key])}")
    for warning in meta.get("engine_warnings") or []:
        lines.append(f"{'warning:':18} {warning}")
    lines += _eval_lines(meta)
    if plan and job.plan is not None:
        lines.append(plan_view(job.plan))
    return "\n".join(line.rstrip() for line in lines)


def _workload_lines(workload: dict[str, Any] | None) -> list[str]:
    """What the job trains, as counted at enqueue (jobs.workload): tokens, steps, and what max_length cuts."""
    if not workload:
        return [f"{'workload:':18} -"]
    how = ("counted with the hero's tokenizer" if workload.get("counted")
           else "estimated: the tokenizer was not available")
    lines = [f"{'workload:':18} {workload.get('train_tokens', 0):,} tokens over {workload.get('steps', '?')} steps "
             f"({workload.get('data_tokens', 0):,} in the data; {how})"]
    message = (workload.get("truncation") or {}).get("message")
    if message:
        lines.append(f"{'truncation:':18} {message}")
    return lines


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
    return "\n".join(line.rstrip() for line in lines)


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _when(seconds: float | None, unknown: str = "?") -> str:
    if seconds is None:
        return unknown
    return "now" if seconds < 0.5 else f"in {duration_text(seconds)}"


def plan_text(plan: dict[str, Any]) -> str:
    """``jobs plan`` / ``enqueue --plan`` for a person: what runs, the queue with start and finish times and what each
    job waits for, the speeds used, and the total (or why there is none)."""
    lines = []
    for r in plan["running"]:
        left = "time left unknown" if r["remaining_s"] is None else f"about {duration_text(r['remaining_s'])} left"
        step = f"step {r['step']}/{r['total_steps']}, " if r.get("step") is not None else ""
        lines.append(f"running  {r['id']} on {r['worker'] or '?'} ({r['campaign_id']}): {step}{left}")
    if plan["jobs"]:
        lines.append(f"{'':4} {'#':>3}  {'ID':44} {'PRIO':6} {'CAMPAIGN':16} {'TOKENS':>9}  {'STARTS':>15}  "
                     f"{'DONE':>15}  WAITS FOR / NOTES")
    for n, j in enumerate(plan["jobs"], 1):
        notes = [j["waiting"] or (f"after job {j['after']}" if j.get("after") else "")]
        if j["tokens_basis"] != "counted":
            notes.append(f"tokens {j['tokens_basis']}")
        if j["truncation"]:
            notes.append(j["truncation"])
        mark = "NEW " if j.get("new") else ""
        lines.append(f"{mark:4} {n:>3}  {j['id'][:44]:44} {j['priority']:6} {j['campaign_id'][:16]:16} "
                     f"{j['train_tokens']:>9,}  {_when(j['start_s']):>15}  {_when(j['eta_s']):>15}  "
                     + "; ".join(x for x in notes if x))
    for refused in plan.get("refused", []):
        lines.append(f"DUP  {refused['path']}: the enqueue would refuse it: {refused['why']}")
    for s in plan["speeds"]:
        lines.append(f"speed    {s['hero_id']} on {s['device']}: {s['text']}")
    w = plan["workers"]
    lines.append(f"workers  {len(w['planned_on'])} planned on ({', '.join(w['planned_on']) or 'none'})"
                 + (f"; paused: {', '.join(w['paused'])}" if w["paused"] else ""))
    t = plan["totals"]
    done = f"all done in about {duration_text(t['eta_s'])}" if t["eta_s"] is not None else "no ETA"
    lines.append(f"total    {t['jobs']} jobs, {t['num_examples']:,} examples, {t['train_tokens']:,} tokens; {done}"
                 + (f" ({t['note']})" if t["note"] else ""))
    return "\n".join(line.rstrip() for line in lines)
