"""Submitting datasets: validate a whole batch, then store, record and queue every file of it, or none.

Used by ``python -m enqueue``. Imports neither torch nor transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from campaigns.campaign import Campaign, CampaignStore, check_name, default_campaign_name
from campaigns.errors import CampaignError
from config.code_version import git_commit
from config.errors import ConfigError, GuildError
from config.layers import resolve_job_config
from config.locked import build_locked_config
from config.settings import Settings
from engine.formats import DatasetError
from heroes.profile import DEFAULT_HERO, load_hero
from jobs.datasets import store_dataset
from jobs.errors import DuplicateDataset
from jobs.job import Job, make_job_id
from jobs.keys import PRIORITIES
from jobs.store import JobStore

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


def resolve_campaign(settings: Settings, hero_id: str | None, campaign_name: str | None,
                     sets: dict[str, str]) -> tuple[object, Campaign | None, str, object]:
    """The hero and campaign a submission goes to (the campaign is not created here), and the resolved config.

    Returns:
        (hero, existing campaign or None, campaign name, resolved TrainerConfig).
    """
    store = CampaignStore(settings.guild_home)
    existing = None
    if campaign_name is not None:
        check_name(campaign_name)
        if store.exists(campaign_name):
            existing = store.get(campaign_name)
            if hero_id is not None and hero_id != existing.hero_id:
                raise GuildError(f"campaign {campaign_name} trains hero {existing.hero_id}, not {hero_id}; "
                                 f"drop --hero or pick another campaign")
            hero_id = existing.hero_id
    hero = load_hero(hero_id or DEFAULT_HERO, settings.guild_home)
    name = campaign_name or default_campaign_name(hero.id)
    if existing is None and store.exists(name):
        existing = store.get(name)
    # Resolve the whole config now: a bad --set or config.json fails the batch before anything is queued.
    resolved = resolve_job_config(settings.guild_home, hero, existing.config_overrides if existing else None, sets)
    return hero, existing, name, resolved.config


def ensure_campaign(settings: Settings, hero, existing: Campaign | None, name: str) -> Campaign:
    """The campaign to join: ``existing``, else a new one; a concurrent submitter may create it first."""
    if existing is not None:
        return existing
    try:
        return create_campaign(settings, hero, name, {})
    except CampaignError:
        store = CampaignStore(settings.guild_home)
        if not store.exists(name):
            raise
        campaign = store.get(name)  # created by another submission a moment ago: join it
        if campaign.hero_id != hero.id:
            raise GuildError(f"campaign {name} trains hero {campaign.hero_id}, not {hero.id}") from None
        return campaign


def create_campaign(settings: Settings, hero, name: str, overrides: dict) -> Campaign:
    """Create and write a campaign of ``hero`` with ``overrides`` (the campaign config layer)."""
    resolved = resolve_job_config(settings.guild_home, hero, overrides, None, campaign_origin=f"campaign {name}")
    locked = build_locked_config(hero, hero.model_path(settings.guild_home), resolved.config.hyperparams.max_length,
                                 hero.version)
    campaign = Campaign(id=check_name(name), hero_id=hero.id, code_version=git_commit(),
                        config_hash=resolved.config.config_hash(), config_overrides=overrides, locked=locked)
    return CampaignStore(settings.guild_home).create(campaign)


def submit(settings: Settings, store: JobStore, request: SubmitRequest, publish) -> list[Job]:
    """Validate the batch, then store datasets, create jobs and publish their messages.

    Args:
        publish: ``publish(job_id, priority)`` sends one job's message.

    Raises:
        BatchRejected, ConfigError, DuplicateDataset, HeroError, CampaignError: nothing was enqueued.
    """
    if request.priority not in PRIORITIES:
        raise ConfigError([f"--priority {request.priority!r}: use one of {', '.join(PRIORITIES)}"])
    hero, existing, campaign_name, config = resolve_campaign(settings, request.hero_id, request.campaign,
                                                             request.sets)
    files = check_files(request.paths)
    _refuse_duplicates(store, files, request.force)
    campaign = ensure_campaign(settings, hero, existing, campaign_name)

    created: list[Job] = []
    try:
        for f in files:
            stored = store_dataset(settings.guild_home, f.sha256, f.source)
            job = Job(id=make_job_id(Path(f.path).name), dataset_path=str(stored), hero_id=hero.id,
                      campaign_id=campaign.id, priority=request.priority, num_examples=f.num_examples,
                      estimated_tokens=f.estimated_tokens, git_commit=git_commit(),
                      metadata={"source_path": str(Path(f.path).resolve()), "format": f.format,
                                "config_sets": dict(request.sets)})
            created.append(store.create(job, f.sha256, force=request.force))
        for job in created:
            publish(job.id, job.priority)
        store.mark_published([j.id for j in created])
    except BaseException:
        _rollback(store, created)
        raise
    with CampaignStore(settings.guild_home).edit(campaign.id) as c:
        c.job_ids.extend(j.id for j in created if j.id not in c.job_ids)
    if request.priority == "high" and (request.preempt or config.queue.preempt_low):
        from jobs.control import preempt_low_if_needed

        preempted = preempt_low_if_needed(store, settings.heartbeat_stale_s)
        if preempted:
            logger.warning("preempting low job %s for %s", preempted, created[0].id)
    return created


def _refuse_duplicates(store: JobStore, files: list[CheckedFile], force: bool) -> None:
    if force:
        return
    import json

    from jobs import keys

    problems, seen = [], {}
    for f in files:
        if f.sha256 in seen:
            problems.append(f"{f.path}: same content as {seen[f.sha256]} in this batch; use --force to train both")
            continue
        seen[f.sha256] = f.path
        for raw in sorted(store.redis.smembers(keys.DATASET_OWNER.format(sha=f.sha256))):
            job_id = raw.decode()
            status = store.redis.hget(keys.JOB.format(id=job_id), "status")
            if status and json.loads(status) in ("queued", "processing", "completed"):
                problems.append(f"{f.path}: same content as job {job_id} ({json.loads(status)}); "
                                "use --force to train on it again")
                break
    if problems:
        raise DuplicateDataset("\n".join(problems))


def _rollback(store: JobStore, jobs: list[Job]) -> None:
    from jobs import keys

    for job in jobs:
        try:
            sha = job.metadata.get("dataset_sha256", "")
            with store.redis.pipeline() as pipe:
                pipe.delete(keys.JOB.format(id=job.id), keys.JOB_HISTORY.format(id=job.id))
                pipe.zrem(keys.JOBS_ALL, job.id)
                pipe.hdel(keys.JOBS_SUMMARY, job.id)
                pipe.zrem(keys.JOBS_QUEUED, job.id)
                pipe.srem(keys.JOBS_BY_STATUS.format(status="queued"), job.id)
                pipe.zrem(keys.CAMPAIGN_PENDING.format(id=job.campaign_id), job.id)
                pipe.srem(keys.DATASET_OWNER.format(sha=sha), job.id)
                pipe.zrem(keys.JOBS_UNPUBLISHED, job.id)
                pipe.execute()
        except Exception:  # noqa: BLE001 - best effort; Redis may be the thing that failed
            logger.exception("could not roll back job %s", job.id)
