"""The Job record and its state machine.

    queued ──claim──▶ processing ──▶ completed | failed | skipped | cancelled
      ▲                  │
      └──── requeue ─────┘   (retry after a transient failure, pause, preemption, a lost worker)
    failed | cancelled ──retry──▶ queued

Every change of status goes through :meth:`jobs.store.JobStore.transition`, which checks
:func:`check_transition` and writes the record, its indexes and its history atomically.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from jobs.errors import IllegalTransition


class JobStatus(str, Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ALLOWED = {
    JobStatus.QUEUED: {JobStatus.PROCESSING, JobStatus.CANCELLED},
    JobStatus.PROCESSING: {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.SKIPPED, JobStatus.CANCELLED,
                           JobStatus.QUEUED},
    JobStatus.FAILED: {JobStatus.QUEUED},
    JobStatus.CANCELLED: {JobStatus.QUEUED},
    JobStatus.COMPLETED: set(),
    JobStatus.SKIPPED: set(),
}
TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.SKIPPED, JobStatus.CANCELLED}
ACTIVE = {JobStatus.QUEUED, JobStatus.PROCESSING}


def check_transition(job_id: str, current: JobStatus, target: JobStatus) -> None:
    """Raise IllegalTransition when ``current → target`` is not an edge of the state machine."""
    if target not in ALLOWED[current]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[current])) or "nothing (final)"
        raise IllegalTransition(f"job {job_id}: cannot go from {current.value} to {target.value}; "
                                f"from {current.value} it may go to {allowed}")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def make_job_id(filename: str, when: datetime | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SS_<filename>`` (local time, filename reduced to safe characters)."""
    when = when or datetime.now()
    name = _UNSAFE.sub("_", filename).strip("._") or "dataset"
    return f"{when.strftime('%Y-%m-%dT%H:%M:%S')}_{name[:80]}"


@dataclass
class Job:
    """One dataset to train, and everything known about its training.

    Times are ISO-8601 UTC strings. ``progress`` is set while it runs: ``{step, total_steps, loss,
    tokens_per_sec, eta_s}``. ``metadata`` holds free-form extras (the original path, worker, checkpoint,
    truncation counts, the resolved config, artifacts...).
    """

    id: str
    dataset_path: str
    hero_id: str
    campaign_id: str
    priority: str
    status: JobStatus = JobStatus.QUEUED
    attempts: int = 0
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    start_step: int | None = None
    final_step: int | None = None
    final_loss: float | None = None
    final_val_loss: float | None = None
    last_error: str | None = None
    num_examples: int = 0
    estimated_tokens: int = 0
    config_hash: str | None = None
    git_commit: str | None = None
    trained_tokens: int | None = None
    tokens_per_sec: float | None = None
    progress: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # files a finished job produced (loss_plot, ...)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["status"] = JobStatus(kwargs.get("status", "queued"))
        return cls(**kwargs)


FIELDS = tuple(f.name for f in dataclasses.fields(Job))
