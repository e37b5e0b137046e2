"""Checkpoint retention: what a campaign keeps on disk, what a prune frees, what its checkpoints use.

Every job writes ``checkpoints/<job>/step-N`` directories holding the weights and the optimizer and RNG state
(fp32 AdamW: about three times the weights). Kept forever, that is gigabytes per job for a 0.6B model. Each
campaign has a policy (``retention`` in ``campaign.json``, set by ``campaigns create --keep-full N --keep-weights
N`` or ``campaigns retention NAME ...``):

* ``keep_full`` (default 1): the newest N completed jobs keep their final checkpoint whole (weights, optimizer,
  RNG: what a job resumes from). The newest is the campaign's ``latest_checkpoint``.
* ``keep_weights`` (default 3; ``None`` = all): the newest N completed jobs keep their final weights. Those not
  kept whole are stripped to the weights (they still load with ``from_pretrained``); older finals are removed.

Kept whatever the policy says:

* the campaign's ``latest_checkpoint``, whole (the next job resumes from it);
* the newest checkpoint of every queued, failed or cancelled job, whole (it resumes or is retried from it);
* everything of a processing job (it may be writing), and of a directory no job record names.

Everything else goes: older checkpoints inside a job's directory, older jobs' finals, skipped jobs' checkpoints,
and incomplete leftovers of finished jobs. Deleting is crash-safe (:mod:`engine.checkpoint_layout`): rename to
trash, then remove. The policy runs after every completed job (``tasks.lifecycle``) and by hand with
``python -m campaigns prune NAME [--dry-run]``; two prunes of one campaign never run at once (a ``flock``).
Whether the next checkpoints fit, and when to warn about free space, is :mod:`campaigns.disk`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from campaigns.campaign import Campaign, CampaignStore
from campaigns.disk import file_system_usage, format_bytes
from campaigns.errors import RetentionPolicyError
from config.files import exclusive_lock
from engine import checkpoint_layout as layout
from engine.errors import CheckpointError
from jobs.job import Job, JobStatus

logger = logging.getLogger(__name__)

DEFAULT_KEEP_FULL = 1
DEFAULT_KEEP_WEIGHTS = 3
_LOCK_FILE = ".retention.lock"
_RESUMABLE = (JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobLookup(Protocol):
    """Where retention reads job records (``jobs.store.JobStore`` is one)."""

    def get_many(self, ids: list[str]) -> list[Job]: ...


# ------------------------------------------------------------------------------------------------------ policy


@dataclass(frozen=True)
class RetentionPolicy:
    """How many completed jobs keep their final checkpoint whole, and how many keep their final weights."""

    keep_full: int = DEFAULT_KEEP_FULL
    keep_weights: int | None = DEFAULT_KEEP_WEIGHTS  # None: every completed job's final weights

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.keep_full, int) or isinstance(self.keep_full, bool) or self.keep_full < 1:
            problems.append(f"retention.keep_full={self.keep_full!r}: use a whole number >= 1 (the newest completed "
                            "job's full checkpoint is what the next job resumes from)")
        if self.keep_weights is not None and (not isinstance(self.keep_weights, int)
                                              or isinstance(self.keep_weights, bool) or self.keep_weights < 0):
            problems.append(f"retention.keep_weights={self.keep_weights!r}: use a whole number >= 0, or 'all'")
        if problems:
            raise RetentionPolicyError("; ".join(problems))

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, where: str = "campaign.json") -> RetentionPolicy:
        """The policy stored in a campaign record (missing keys take the defaults).

        Raises:
            RetentionPolicyError: an unknown key or a bad value, naming ``where``.
        """
        record = dict(record or {})
        unknown = sorted(set(record) - {"keep_full", "keep_weights"})
        if unknown:
            raise RetentionPolicyError(f"{where}: unknown retention key(s) {', '.join(unknown)}; "
                                       "use keep_full and keep_weights")
        weights = record.get("keep_weights", DEFAULT_KEEP_WEIGHTS)
        try:
            return cls(keep_full=record.get("keep_full", DEFAULT_KEEP_FULL),
                       keep_weights=None if weights == "all" else weights)
        except RetentionPolicyError as exc:
            raise RetentionPolicyError(f"{where}: {exc}") from None

    def to_record(self) -> dict[str, Any]:
        return {"keep_full": self.keep_full, "keep_weights": "all" if self.keep_weights is None else self.keep_weights}

    def describe(self) -> str:
        weights = "every completed job" if self.keep_weights is None else f"the newest {self.keep_weights} job(s)"
        return (f"full checkpoint of the newest {self.keep_full} completed job(s); final weights of {weights}; "
                "plus what queued, failed, cancelled and running jobs need")


def parse_keep(value: str, option: str) -> int | str:
    """A ``--keep-*`` CLI value: a whole number, or ``all``. Raises RetentionPolicyError."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise RetentionPolicyError(f"{option} {value!r}: use a whole number or 'all'") from None


def policy_of(campaign: Campaign) -> RetentionPolicy:
    return RetentionPolicy.from_record(campaign.retention, f"campaign {campaign.id} (campaign.json 'retention')")


def set_policy(campaigns: CampaignStore, name: str, **changes: int | str) -> RetentionPolicy:
    """Change some of a campaign's policy values (``keep_full=2``, ``keep_weights="all"``); return the new policy.

    It applies from the next prune. Raises RetentionPolicyError (nothing written) on a bad value.
    """
    with campaigns.edit(name) as campaign:
        policy = RetentionPolicy.from_record({**policy_of(campaign).to_record(), **changes},
                                             f"campaign {name}")
        campaign.retention = policy.to_record()
    return policy


# ---------------------------------------------------------------------------------------------------- the plan


class Verdict(str, Enum):
    KEEP = "keep"
    STRIP = "strip"  # keep the weights, remove the optimizer and RNG state
    REMOVE = "remove"


class Kind(str, Enum):
    """What a checkpoint directory is, for the disk figures."""

    FULL = "full"  # resumable: weights, optimizer, RNG
    WEIGHTS = "weights-only"
    RETRY = "kept-for-retry"  # the newest checkpoint of a queued, failed or cancelled job
    RUNNING = "running"  # anything in a processing job's directory
    OTHER = "other"  # incomplete saves, directories no job record names


@dataclass(frozen=True)
class Decision:
    """What retention does with one directory under ``checkpoints/<job>/``."""

    path: Path
    job_id: str
    verdict: Verdict
    kind: Kind  # what it is now
    size_bytes: int
    frees_bytes: int
    reason: str


@dataclass
class RetentionReport:
    campaign: str
    policy: RetentionPolicy
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)
    trash_bytes: int = 0  # leftovers of interrupted deletes, removed too
    freed_bytes: int = 0  # what was freed (a dry run: what would be)
    errors: list[str] = field(default_factory=list)

    def acted_on(self) -> list[Decision]:
        return [d for d in self.decisions if d.verdict != Verdict.KEEP]

    def to_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign, "policy": self.policy.to_record(), "dry_run": self.dry_run,
                "freed_bytes": self.freed_bytes, "trash_bytes": self.trash_bytes, "errors": self.errors,
                "decisions": [{**asdict(d), "path": str(d.path), "verdict": d.verdict.value, "kind": d.kind.value}
                              for d in self.decisions]}


def plan_retention(root: Path, campaign: Campaign, jobs: Mapping[str, Job], policy: RetentionPolicy) -> list[Decision]:
    """Decide, for every directory under ``root`` (``checkpoints/``), whether it stays, is stripped or goes.

    Args:
        root: the campaign's checkpoint directory (``checkpoints/<job>/step-N``).
        jobs: the job records by id; a directory whose job is missing here is kept as it is.
    """
    latest = _real(campaign.latest_checkpoint)
    finals = {}
    for job in jobs.values():
        if job.status == JobStatus.COMPLETED:
            final = _final_checkpoint(root / job.id, job)
            if final is not None:
                finals[job.id] = final
    newest_first = sorted(finals, key=lambda i: (jobs[i].final_step or 0, jobs[i].finished_at or ""), reverse=True)
    keep_full = set(newest_first[: policy.keep_full])
    keep_weights = set(newest_first if policy.keep_weights is None else newest_first[: policy.keep_weights])

    decisions: list[Decision] = []
    for job_dir in _job_dirs(root):
        job = jobs.get(job_dir.name)
        entries = _entries(job_dir)
        complete = [p for p in entries if layout.is_complete(p)]
        newest = layout.latest_checkpoint(job_dir)
        for path in entries:
            size = layout.path_bytes(path)
            kind = _kind_now(path, job)
            if latest is not None and _real(path) == latest:
                verdict, reason = Verdict.KEEP, "the campaign's latest checkpoint: the next job resumes from it"
            elif job is None:
                verdict, reason = Verdict.KEEP, "no job record names this directory: left for you to decide"
            elif job.status == JobStatus.PROCESSING:
                verdict, reason = Verdict.KEEP, "its job is running and may be writing here"
            elif job.status in _RESUMABLE:
                if path == newest:
                    verdict, reason = Verdict.KEEP, f"the newest checkpoint of a {job.status.value} job: it resumes " \
                                                    "from it"
                elif path in complete:
                    verdict, reason = Verdict.REMOVE, "older than its job's newest checkpoint"
                else:
                    verdict, reason = Verdict.KEEP, "an incomplete save: its job clears it when it runs again"
            elif job.status == JobStatus.COMPLETED and path == finals.get(job.id):
                if job.id in keep_full:
                    verdict, reason = Verdict.KEEP, f"final checkpoint of one of the newest {policy.keep_full} " \
                                                    "completed job(s) (keep_full)"
                elif job.id in keep_weights and layout.is_weights_only(path) and not layout.trash_bytes(path):
                    verdict, reason = Verdict.KEEP, "final weights of a recent completed job (keep_weights)"
                elif job.id in keep_weights:
                    verdict, reason = Verdict.STRIP, "final weights of a recent completed job (keep_weights); its " \
                                                     "optimizer and RNG state go"
                else:
                    verdict, reason = Verdict.REMOVE, "final checkpoint of an older completed job"
            elif job.status == JobStatus.COMPLETED:
                verdict, reason = Verdict.REMOVE, "not its completed job's final checkpoint"
            else:
                verdict, reason = Verdict.REMOVE, f"its job was {job.status.value}: nothing resumes from it"
            frees = {Verdict.KEEP: 0, Verdict.REMOVE: size,
                     Verdict.STRIP: layout.training_state_bytes(path) + layout.trash_bytes(path)}[verdict]
            decisions.append(Decision(path, job_dir.name, verdict, kind, size, frees, reason))
    return decisions


def apply_retention(campaigns: CampaignStore, name: str, jobs: JobLookup, dry_run: bool = False) -> RetentionReport:
    """Apply campaign ``name``'s policy to its checkpoints (or, with ``dry_run``, only say what it would do).

    Safe while a job of the campaign runs or completes: job records are read before the campaign record, so a
    job seen processing is left alone and whatever ``latest_checkpoint`` says is kept.

    Raises:
        UnknownCampaign, RetentionPolicyError: nothing was deleted.
    """
    campaign = campaigns.get(name)
    root = campaigns.checkpoint_root(campaign)
    with _exclusive(root.parent):
        records = _records(jobs, root)
        campaign = campaigns.get(name)  # after the job records: see the docstring
        policy = policy_of(campaign)
        report = RetentionReport(campaign.id, policy, dry_run, plan_retention(root, campaign, records, policy))
        trash_dirs = _trash_dirs(root, records)
        report.trash_bytes = sum(layout.trash_bytes(d) for d in trash_dirs)
        if dry_run:
            report.freed_bytes = report.trash_bytes + sum(d.frees_bytes for d in report.decisions)
            return report
        freed = sum(layout.remove_trash(d) for d in trash_dirs)
        for d in report.acted_on():
            try:
                freed += layout.discard_checkpoint(d.path) if d.verdict == Verdict.REMOVE \
                    else layout.strip_to_weights(d.path)
            except (OSError, CheckpointError) as exc:
                report.errors.append(f"{d.path}: {exc}")
        for job_dir in _job_dirs(root):
            job = records.get(job_dir.name)
            if job is not None and job.status in (JobStatus.COMPLETED, JobStatus.SKIPPED):
                with contextlib.suppress(OSError):
                    job_dir.rmdir()  # only when empty
        report.freed_bytes = freed
    acted = report.acted_on()
    if acted or report.trash_bytes:
        logger.info("campaign %s: retention removed %d and stripped %d checkpoint(s), freed %s",
                    campaign.id, sum(d.verdict == Verdict.REMOVE for d in acted),
                    sum(d.verdict == Verdict.STRIP for d in acted), format_bytes(report.freed_bytes))
    for error in report.errors:
        logger.warning("campaign %s: retention: %s", campaign.id, error)
    return report


# ------------------------------------------------------------------------------------------------------- disk


@dataclass(frozen=True)
class DiskUsage:
    """Bytes a campaign's checkpoints use, by kind, and the file system's free space under them."""

    path: str
    full_bytes: int
    weights_only_bytes: int
    retry_bytes: int
    running_bytes: int
    other_bytes: int
    reclaimable_bytes: int | None  # what `campaigns prune` would free now (None: job records unavailable)
    free_bytes: int
    filesystem_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.full_bytes + self.weights_only_bytes + self.retry_bytes + self.running_bytes + self.other_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def disk_usage(campaigns: CampaignStore, campaign: Campaign, jobs: JobLookup | None = None) -> DiskUsage:
    """The disk figures of ``campaign``. Without ``jobs`` (Redis unreachable) checkpoints are classed by content
    only (retry and running ones count as full) and what a prune would free is unknown (None)."""
    root = campaigns.checkpoint_root(campaign)
    records = _records(jobs, root) if jobs is not None else {}
    by_kind = dict.fromkeys(Kind, 0)
    reclaimable = None
    if jobs is not None:
        decisions = plan_retention(root, campaign, records, policy_of(campaign))
        for d in decisions:
            by_kind[d.kind] += d.size_bytes
        reclaimable = sum(d.frees_bytes for d in decisions) + sum(layout.trash_bytes(d)
                                                                  for d in _trash_dirs(root, records))
    else:
        for job_dir in _job_dirs(root):
            for path in _entries(job_dir):
                by_kind[_kind_now(path, None)] += layout.path_bytes(path)
    trash = sum(layout.trash_bytes(d) for d in [root, *_job_dirs(root)])
    usage = file_system_usage(root)
    return DiskUsage(str(root), by_kind[Kind.FULL], by_kind[Kind.WEIGHTS], by_kind[Kind.RETRY],
                     by_kind[Kind.RUNNING], by_kind[Kind.OTHER] + trash, reclaimable, usage.free, usage.total)





# ------------------------------------------------------------------------------------------------ internals


def _job_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _records(jobs: JobLookup, root: Path) -> dict[str, Job]:
    """The records of the jobs that have a directory under ``root`` (only those matter, and retention keeps them
    few: a campaign of thousands of jobs is not read whole after every job)."""
    ids = [d.name for d in _job_dirs(root)]
    return {j.id: j for j in jobs.get_many(ids)} if ids else {}


def _entries(job_dir: Path) -> list[Path]:
    """The checkpoint directories of one job: ``step-N`` (complete or not) and ``.tmp-step-N``."""
    try:
        return sorted(p for p in job_dir.iterdir() if p.is_dir() and (layout.STEP_DIR.match(p.name)
                                                                       or p.name.startswith(layout.TMP_PREFIX)))
    except OSError:
        return []


def _kind_now(path: Path, job: Job | None) -> Kind:
    if not layout.is_complete(path):
        return Kind.RUNNING if job is not None and job.status == JobStatus.PROCESSING else Kind.OTHER
    if layout.is_weights_only(path):
        return Kind.WEIGHTS
    if job is not None and job.status == JobStatus.PROCESSING:
        return Kind.RUNNING
    if job is not None and job.status in _RESUMABLE and path == layout.latest_checkpoint(path.parent):
        return Kind.RETRY
    return Kind.FULL


def _final_checkpoint(job_dir: Path, job: Job) -> Path | None:
    """A completed job's final checkpoint in its own directory: the one its record names, else its newest."""
    named = (job.metadata or {}).get("checkpoint")
    if named and Path(named).parent == job_dir and layout.is_complete(Path(named)):
        return Path(named)
    return layout.latest_checkpoint(job_dir)


def _trash_dirs(root: Path, jobs: Mapping[str, Job]) -> list[Path]:
    """Where leftover trash may be cleared: the checkpoint root and the directories of known jobs not running."""
    idle = [d for d in _job_dirs(root) if d.name in jobs and jobs[d.name].status != JobStatus.PROCESSING]
    return [root, *idle]


def _real(path: str | Path | None) -> str | None:
    return os.path.realpath(path) if path else None





@contextlib.contextmanager
def _exclusive(campaign_dir: Path) -> Iterator[None]:
    """One prune of a campaign at a time (its own lock file: a long delete never blocks campaign.json edits)."""
    campaign_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(campaign_dir / _LOCK_FILE):
        yield
