"""Setting a campaign's eval set: validate the file (and its probes) like any dataset, count its tokens as
training would, check it against every token budget it must fit, store it content-addressed, and record the change.

Used by ``python -m campaigns create --eval-file`` and ``python -m campaigns eval-set``; :func:`check_enqueue`
is how ``python -m enqueue`` refuses a job whose budget the campaign's set exceeds. Torch-free: tokens are counted
with ``tokenizers`` and ``jinja2`` (:mod:`engine.chat_tokenizer`), exactly as a worker tokenises. A bad file, a bad
option or a set over budget changes nothing: the campaign record is written last, in one atomic replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaigns.campaign import Campaign, CampaignStore, new_campaign
from campaigns.errors import CampaignError, EvalBudgetExceeded, EvalSetRejected
from campaigns.eval_set import (
    DEFAULT_NUM_PROBES,
    MAX_PROBE_NEW_TOKENS,
    MAX_PROBES,
    EvalSet,
    EvalSetChange,
    current_eval_set,
    probes_of_file,
    record_change,
)
from config.layers import resolve_job_config
from config.schema import TrainerConfig
from config.settings import Settings
from engine.eval_plan import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROBE_SEED, probes_from_examples
from engine.formats import DatasetError, Example
from heroes.profile import Hero, load_hero
from jobs.datasets import store_dataset
from jobs.job import JobStatus
from jobs.job_plan import JobPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSetRequest:
    """What ``--eval-file`` and its options ask for.

    Attributes:
        path: the eval set (any dataset format).
        probes_path: a file of probe prompts (``messages`` or ``prompt``/``response`` lines: the prompt is everything
            before the final assistant reply, which is kept as the reference); None: the eval file's first
            conversations.
        num_probes: how many probes (default 4 from the eval file, every line of a probes file; at most 16); 0: none.
        max_new_tokens: the most tokens of each answer.
        seed: seeds generation.
        max_length: the set's examples are cut here for every job; None: the campaign's ``hyperparams.max_length``.
    """

    path: str
    probes_path: str | None = None
    num_probes: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_PROBE_SEED
    max_length: int | None = None


def create_with_eval_set(settings: Settings, hero: Hero, name: str, overrides: dict[str, Any],
                         request: EvalSetRequest) -> Campaign:
    """Create campaign ``name`` with its eval set recorded at step 0; nothing is created when anything is wrong.

    Raises:
        EvalSetRejected, EvalBudgetExceeded, ConfigError, CampaignError (name taken or bad).
    """
    campaign = new_campaign(settings.guild_home, hero, name, overrides)  # a bad name or config fails first
    existing = CampaignStore(settings.guild_home).find_dir(name)
    if existing is not None:
        raise CampaignError(f"campaign {name!r} already exists ({existing}); pick another name, or set its eval set "
                            f"with python -m campaigns eval-set {name} FILE")
    eval_set, config = build_eval_set(settings, hero, overrides, request, name)
    _refuse([p for p in [_campaign_budget(eval_set, config, name)] if p])
    record_change(campaign, eval_set)
    return CampaignStore(settings.guild_home).create(campaign)


def set_eval_set(settings: Settings, job_store, name: str, request: EvalSetRequest | None) -> EvalSetChange:
    """Set (``request``) or remove (None) campaign ``name``'s eval set, from the campaign's current step.

    The set must fit the campaign's own ``eval_max_tokens`` and that of every job of the campaign still queued
    (they will evaluate on it when they start).

    Raises:
        EvalSetRejected, EvalBudgetExceeded, UnknownCampaign, ConfigError: nothing changed.
    """
    campaigns = CampaignStore(settings.guild_home)
    campaign = campaigns.get(name)
    eval_set = None
    if request is not None:
        hero = load_hero(campaign.hero_id, settings.guild_home)
        eval_set, config = build_eval_set(settings, hero, campaign.config_overrides, request, name)
        problems = [_campaign_budget(eval_set, config, name)]
        problems += [_job_budget(eval_set, job) for job in _queued_jobs(job_store, name)]
        _refuse([p for p in problems if p])
    with campaigns.edit(name) as record:
        change = record_change(record, eval_set)
    logger.info("campaign %s: eval set %s from step %d", name, eval_set.short if eval_set else "removed",
                change.from_step)
    return change


def check_enqueue(campaign: Campaign | None, plan: JobPlan) -> None:
    """Refuse a job whose ``hyperparams.eval_max_tokens`` the campaign's eval set exceeds.

    Raises:
        EvalBudgetExceeded: with both numbers and the fix.
    """
    eval_set = current_eval_set(campaign) if campaign is not None else None
    if eval_set is None:
        return
    problem = eval_set.budget_problem(plan.config.hyperparams.eval_max_tokens)
    if problem:
        raise EvalBudgetExceeded(f"campaign {campaign.id}: {problem}; nothing enqueued")


# ------------------------------------------------------------------------------------------------ building


def build_eval_set(settings: Settings, hero: Hero, overrides: dict[str, Any] | None, request: EvalSetRequest,
                   campaign_name: str) -> tuple[EvalSet, TrainerConfig]:
    """Validate, count and store an eval set (and its probes) for a campaign of ``hero``; also return the campaign's
    resolved config (for its budget).

    Raises:
        EvalSetRejected: one ``FILE:LINE: problem`` (or bad option) per line.
        ConfigError: the campaign's config does not resolve.
    """
    config = resolve_job_config(settings.guild_home, hero, overrides, None,
                                campaign_origin=f"campaign {campaign_name}").config
    max_length = request.max_length if request.max_length is not None else config.hyperparams.max_length
    _check_options(request, max_length, hero)
    limits = settings.dataset_limits
    summary, examples = _read(request.path, limits)
    if request.probes_path is not None:
        _, probe_examples = _read(request.probes_path, limits)
        probes = probes_of_file(request.probes_path, probe_examples, request.num_probes)
        probes_source = str(Path(request.probes_path).resolve())
    else:
        probes = probes_from_examples(examples, DEFAULT_NUM_PROBES if request.num_probes is None
                                      else request.num_probes)
        probes_source = "eval file"
    num_tokens, counted = _count_tokens(settings, hero, examples, request.path, max_length, summary.estimated_tokens)

    stored = store_dataset(settings.guild_home, summary.sha256, Path(request.path))
    probes_sha = probes_path = None
    if probes:
        data = "".join(json.dumps(p.to_line(), ensure_ascii=False) + "\n" for p in probes).encode("utf-8")
        probes_sha = hashlib.sha256(data).hexdigest()
        probes_path = str(store_dataset(settings.guild_home, probes_sha, data))
    eval_set = EvalSet(sha256=summary.sha256, path=str(stored), source=str(Path(request.path).resolve()),
                       format=summary.format, num_examples=summary.num_examples, num_tokens=num_tokens,
                       tokens_counted=counted, max_length=max_length, probes_sha256=probes_sha,
                       probes_path=probes_path, num_probes=len(probes),
                       probes_source=probes_source if probes else None, max_new_tokens=request.max_new_tokens,
                       seed=request.seed)
    return eval_set, config


def _check_options(request: EvalSetRequest, max_length: int, hero: Hero) -> None:
    problems = []
    if request.num_probes is not None and not 0 <= request.num_probes <= MAX_PROBES:
        problems.append(f"--num-probes {request.num_probes}: use 0 to {MAX_PROBES}")
    if not 1 <= request.max_new_tokens <= MAX_PROBE_NEW_TOKENS:
        problems.append(f"--max-new-tokens {request.max_new_tokens}: use 1 to {MAX_PROBE_NEW_TOKENS}")
    if not 1 <= max_length <= hero.context_length:
        problems.append(f"--max-length {max_length}: use 1 to hero {hero.id}'s context length {hero.context_length}")
    _refuse(problems, EvalSetRejected)


def _read(path: str, limits) -> tuple[Any, list[Example]]:
    """Validate (streaming, with the dataset limits), then read a file's examples."""
    from engine.formats import read_examples, validate_file

    try:
        summary = validate_file(path, path, limits=limits)
        return summary, read_examples(path, path, limits=limits)
    except DatasetError as exc:
        raise EvalSetRejected("\n".join(exc.report_lines())) from None


def _count_tokens(settings: Settings, hero: Hero, examples: list[Example], source: str, max_length: int,
                  estimate: int) -> tuple[int, bool]:
    """The set's tokens at ``max_length``, as a worker will tokenise it; estimated when the hero's tokenizer is not on
    this machine (``(tokens, counted)``)."""
    from engine.chat_tokenizer import load_chat_tokenizer
    from engine.errors import DatasetInvalid, ModelLoadError
    from engine.tokenize import tokenize_examples

    tokenizer_dir = hero.local_tokenizer_dir(settings.guild_home)
    if tokenizer_dir is None:
        return min(estimate, len(examples) * max_length), False
    try:
        tokenized = tokenize_examples(examples, load_chat_tokenizer(tokenizer_dir), max_length,
                                      chat=hero.chat_options, source=source)
    except DatasetInvalid as exc:
        raise EvalSetRejected(str(exc)) from None
    except ModelLoadError as exc:  # the hero's template is broken: say so, the worker would fail the same way
        raise EvalSetRejected(f"{source}: cannot be tokenised for hero {hero.id}: {exc}") from None
    if not tokenized.examples:
        raise EvalSetRejected(f"{source}: none of its {len(examples)} examples has a token to learn within "
                              f"max_length {max_length}; pass a larger --max-length or shorten the prompts")
    return sum(len(e) for e in tokenized.examples), True


# ------------------------------------------------------------------------------------------------- budgets


def _campaign_budget(eval_set: EvalSet, config: TrainerConfig, name: str) -> str | None:
    problem = eval_set.budget_problem(config.hyperparams.eval_max_tokens)
    return f"campaign {name}: {problem}" if problem else None


def _job_budget(eval_set: EvalSet, job) -> str | None:
    if job.plan is None:
        return None
    problem = eval_set.budget_problem(job.plan.config.hyperparams.eval_max_tokens)
    return f"queued job {job.id}: {problem}" if problem else None


def _queued_jobs(job_store, name: str) -> list:
    jobs = job_store.get_many(job_store.campaign_pending(name))
    return [j for j in jobs if j.status == JobStatus.QUEUED]


def _refuse(problems: list[str], error: type = EvalBudgetExceeded) -> None:
    if problems:
        raise error("\n".join(problems) + ("" if error is EvalSetRejected else "\nnothing changed"))
