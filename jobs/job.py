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
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import PurePath
from typing import Any

from config.clock import utc_now
from jobs.errors import IllegalTransition
from jobs.job_plan import JobPlan

__all__ = ["ACTIVE", "ALLOWED", "FIELDS", "TERMINAL", "Job", "JobStatus", "StopReason", "check_transition",
           "id_variant", "make_job_id", "utc_now"]


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


class StopReason(str, Enum):
    """Why a running job is asked to stop at its next step (``JobStore.request_stop``)."""

    CANCEL = "cancel"  # by an operator: the job checkpoints and ends cancelled
    PAUSE = "pause"  # its worker is paused: the job checkpoints and goes back to the head of its queue
    PREEMPT = "preempt"  # a high job needs the GPU: same as pause, on a low job
    LOCK_LOST = "campaign lock lost"  # set by the worker itself: another worker may own the campaign now
    TAKEN_OVER = "taken over"  # set by the worker itself: the job was given to another worker (this one stalled)

    def __str__(self) -> str:
        return self.value


_UNSAFE = re.compile(r"[^\w.-]+")  # \w is Unicode-aware: letters of every script and digits are kept
ID_TIME_FORMAT = "%Y%m%dT%H%M%S"  # ISO 8601 basic format: no colons (they break scp and some file systems)
MAX_NAME_CHARS = 80


def _fold(char: str) -> str:
    """``é`` → ``e``, ``ﬁ`` → ``fi``: a character whose compatibility decomposition minus its accents is ASCII;
    any other character as it is (``数``, ``が``, ``ß``), so no script loses its meaning."""
    bare = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return bare if bare.isascii() else char


def _readable_name(filename: str) -> str:
    """A file's stem as safe id characters: accents folded to ASCII (café → cafe), other scripts kept (数据)."""
    stem = PurePath(filename).stem if PurePath(filename).suffix else filename
    folded = "".join(_fold(c) for c in unicodedata.normalize("NFC", stem))
    name = _UNSAFE.sub("_", folded).strip("._-")
    return name[:MAX_NAME_CHARS].rstrip("._-") or "dataset"


def make_job_id(filename: str, when: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSS_<name>``: local time, then the file's name without its extension, reduced to letters
    (of any script; accents folded), digits, ``.``, ``-`` and ``_``. Safe as a path segment, in a URL and for scp."""
    when = when or datetime.now()
    return f"{when.strftime(ID_TIME_FORMAT)}_{_readable_name(filename)}"


def id_variant(base_id: str, n: int) -> str:
    """The ``n``-th candidate id for ``base_id`` (1: itself; then ``base-2``, ``base-3``...): used on collision."""
    return base_id if n == 1 else f"{base_id}-{n}"


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
    final_eval_loss: float | None = None  # the campaign's eval set at final_step (campaigns.eval_set)
    last_error: str | None = None
    num_examples: int = 0
    estimated_tokens: int = 0
    config_hash: str | None = None
    git_commit: str | None = None
    trained_tokens: int | None = None
    tokens_per_sec: float | None = None  # over train_s: evaluation time is left out
    train_s: float | None = None  # the training loop's wall time, evaluations excluded
    eval_s: float | None = None  # time spent evaluating (validation split, eval set, probe answers)
    progress: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)  # files a finished job produced (loss_plot, ...)
    # what it trains, counted at enqueue (jobs.workload.Workload.to_dict: truncation, tokens, steps); ETAs use it
    workload: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    plan: JobPlan | None = None  # what it trains, resolved once at enqueue (None only for hand-made records)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, plan=None))
        data["status"] = self.status.value
        data["plan"] = self.plan.to_dict() if self.plan is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["status"] = JobStatus(kwargs.get("status", "queued"))
        plan = kwargs.get("plan")
        kwargs["plan"] = JobPlan.from_dict(plan) if isinstance(plan, dict) else plan
        return cls(**kwargs)


FIELDS = tuple(f.name for f in dataclasses.fields(Job))
