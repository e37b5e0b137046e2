"""Formatting of job records for the CLIs (text tables, one-record views)."""

from __future__ import annotations

from typing import Any

from jobs.job import Job


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


def job_view(job: Job) -> str:
    lines = []
    for key, value in job.to_dict().items():
        if key in ("metadata", "artifacts"):
            continue
        lines.append(f"{key + ':':18} {_fmt(value)}")
    meta = job.metadata or {}
    for key, value in (job.artifacts or {}).items():
        lines.append(f"{key + ':':18} {value}")
    for key in ("checkpoint", "source_path", "num_truncated", "num_dropped"):
        if meta.get(key) is not None:
            lines.append(f"{key + ':':18} {_fmt(meta[key])}")
    return "\n".join(lines)
