"""Submitting datasets: validate a whole batch, resolve its plan once, then store, record and queue every file of
it, or none.

Used by ``python -m enqueue``. Imports neither torch nor transformers, nor Celery: the caller injects the publisher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaigns.campaign import CampaignStore, find_target, join_or_create
from config.errors import ConfigError, GuildError
from config.settings import Settings
from engine.formats import DatasetError
from jobs.control import preempt_low_if_needed
from jobs.datasets import store_dataset
from jobs.errors import DuplicateDataset
from jobs.eval_sets import check_enqueue as check_eval_budget
from jobs.job import Job, make_job_id
from jobs.job_plan import JobPlan, resolve_plan
from jobs.publisher import Publisher
from jobs.queues import PRIORITIES

logger = logging.getLogger(__name__)


@dataclass
class SubmitRequest:
    paths: list[str]
    priority: str = "normal"
    hero_id: str | None = None
    campaign: str | None = None
    sets: dict[str, str] = field(default_factory=dict)
    force: bool = False
    preempt: bool = False  # a high job may make a low job step aside when every worker is busy with low jobs


@dataclass
class CheckedFile:
    path: str
    source: Path  # the file itself: validated in one streaming pass, copied into the store in another
    sha256: str
    num_examples: int
    estimated_tokens: int
    format: str
    workload: Any = None  # jobs.workload.Workload once counted under the batch's plan (count_workloads)


class BatchRejected(GuildError):
    """Raised when any file of a batch is unusable; nothing of the batch was enqueued. One problem per line."""


def check_files(paths: list[str], limits=None) -> list[CheckedFile]:
    """Validate every line of every file, streaming. Raises BatchRejected listing every problem of every file.

    Args:
        limits: the :class:`engine.formats.DatasetLimits` to apply; default: the settings' (GUILD_MAX_*).
    """
    from config.settings import get_settings
    from engine.formats import validate_file

    limits = limits or get_settings().dataset_limits
    checked, problems = [], []
    for path in paths:
        try:
            summary = validate_file(path, path, limits=limits)
        except DatasetError as exc:
            problems.extend(exc.report_lines())
            continue
        checked.append(CheckedFile(path, Path(path), summary.sha256, summary.num_examples, summary.estimated_tokens,
                                   summary.format))
    if problems:
        raise BatchRejected("\n".join(problems))
    return checked


def count_workloads(files: list[CheckedFile], plan: JobPlan) -> None:
    """Count what each file trains under ``plan``: tokens after truncation at its ``max_length``, steps, tokens
    (``jobs.workload``). Raises BatchRejected listing every file the hero's chat template cannot render."""
    from engine.errors import EngineError
    from jobs.workload import estimate_workload

    problems = []
    for f in files:
        try:
            f.workload = estimate_workload(f.source, f.num_examples, plan, source=f.path)
        except EngineError as exc:
            problems.append(str(exc) if str(exc).startswith(f.path) else f"{f.path}: {exc}")
    if problems:
        raise BatchRejected("\n".join(problems))


def truncation_warning(name: str, workload: dict[str, Any] | None) -> str | None:
    """``FILE: 51 of 240 examples exceed max_length 256 (...); raise it with --set max_length=512 or shorten them``
    when ``max_length`` cuts any example of a job (``workload``: ``Job.workload``), else None."""
    report = (workload or {}).get("truncation") or {}
    return f"{name}: {report['message']}" if report.get("num_over") else None


def check_request(request: SubmitRequest) -> None:
    """Raise ConfigError for options that contradict each other."""
    if request.priority not in PRIORITIES:
        raise ConfigError([f"--priority {request.priority!r}: use one of {', '.join(PRIORITIES)}"])


def plan_request(settings: Settings, request: SubmitRequest):
    """The target (hero, campaign) and the frozen plan of a submission; nothing is created.

    Raises:
        ConfigError, HeroError, CampaignError, PlanMismatch (the campaign's locked block differs from the hero's),
        EvalBudgetExceeded (the campaign's eval set is over this job's hyperparams.eval_max_tokens).
    """
    target = find_target(settings.guild_home, request.hero_id, request.campaign)
    overrides = target.campaign.config_overrides if target.campaign is not None else None
    # Resolve the whole config now, once: a bad --set or config.json fails the batch before anything is queued,
    # and what the worker trains is exactly what was validated and hashed here.
    plan = resolve_plan(settings.guild_home, target.hero, target.name, overrides, request.sets)
    if target.campaign is not None:
        plan.check_locked(target.campaign.id, target.campaign.locked)
        check_eval_budget(target.campaign, plan)  # the campaign's eval set must fit this job's eval_max_tokens
    return target, plan


def submit(settings: Settings, store, request: SubmitRequest, publish: Publisher) -> list[Job]:
    """Validate the batch, resolve its plan, then store datasets, create jobs and publish their messages.

    Args:
        store: the job store (:class:`jobs.store.JobStore` or the in-memory one).
        publish: sends one job's message (``tasks.publish.CeleryPublisher``).

    Raises:
        BatchRejected, ConfigError, DuplicateDataset, HeroError, CampaignError, PlanMismatch, StoreLayoutError:
        nothing was enqueued.
    """
    check_request(request)
    target, plan = plan_request(settings, request)
    files = check_files(request.paths)
    _refuse_duplicates(store, files, request.force)
    count_workloads(files, plan)
    store.check_writable(target.name)  # a corrupted Guild key: refuse before storing datasets or a campaign
    campaign = join_or_create(settings.guild_home, target)
    plan.check_locked(campaign.id, campaign.locked)  # a campaign created concurrently may be of another block

    created: list[Job] = []
    try:
        for f in files:
            created.append(store.create(_new_job(settings, f, request, campaign.id, plan), f.sha256,
                                        force=request.force))
        for job in created:
            publish(job.id, job.priority)
        store.mark_published([j.id for j in created])
    except BaseException:
        _rollback(store, created)
        raise
    with CampaignStore(settings.guild_home).edit(campaign.id) as c:
        c.job_ids.extend(j.id for j in created if j.id not in c.job_ids)
    if request.priority == "high" and (request.preempt or plan.queue.preempt_low):
        preempted = preempt_low_if_needed(store, settings.heartbeat_stale_s)
        if preempted:
            logger.warning("preempting low job %s for %s", preempted, created[0].id)
    return created


def _new_job(settings: Settings, f: CheckedFile, request: SubmitRequest, campaign_id: str, plan: JobPlan) -> Job:
    stored = store_dataset(settings.guild_home, f.sha256, f.source)
    return Job(id=make_job_id(Path(f.path).name), dataset_path=str(stored), hero_id=plan.hero.id,
               campaign_id=campaign_id, priority=request.priority, num_examples=f.num_examples,
               estimated_tokens=f.estimated_tokens, config_hash=plan.config_hash, git_commit=plan.git_commit,
               plan=plan, metadata={"source_path": str(Path(f.path).resolve()), "format": f.format},
               workload=f.workload.to_dict() if f.workload is not None else None)


def duplicates(store, files: list[CheckedFile], force: bool) -> dict[str, str]:
    """``{file path: why it is refused}`` for every file the enqueue refuses as a duplicate (none with ``force``)."""
    if force:
        return {}
    found, seen = {}, {}
    for f in files:
        if f.sha256 in seen:
            found[f.path] = f"same content as {seen[f.sha256]} in this batch; use --force to train both"
            continue
        seen[f.sha256] = f.path
        owner = store.live_owner(f.sha256)
        if owner is not None:
            found[f.path] = f"same content as job {owner} ({store.get(owner).status.value}); use --force to train on " \
                            "it again"
    return found


def _refuse_duplicates(store, files: list[CheckedFile], force: bool) -> None:
    found = duplicates(store, files, force)
    if found:
        raise DuplicateDataset("\n".join(f"{path}: {why}" for path, why in found.items()))


def _rollback(store, jobs: list[Job]) -> None:
    for job in jobs:
        try:
            store.delete(job.id)
        except Exception:  # noqa: BLE001 - best effort; Redis may be the thing that failed
            logger.exception("could not roll back job %s", job.id)
