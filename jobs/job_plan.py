"""The job plan: what one job trains, resolved once at enqueue and frozen.

Hero, model, every config value with the layer that set it, the locked block, the config hash and the git
commit are computed by :func:`resolve_plan` when the job is enqueued, stored with the job, and trained
exactly as stored: editing a hero file or ``config.json`` afterwards changes new jobs only. The queue
settings (``queue.max_attempts``, ``queue.preempt_low``) travel beside the training config, outside its hash.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.clock import utc_now
from config.code_version import git_commit
from config.layers import resolve_job_config
from config.locked import build_locked_config, locked_differences
from config.schema import QueueConfig, TrainerConfig
from heroes.profile import Hero
from jobs.errors import PlanMismatch


@dataclass(frozen=True)
class JobPlan:
    """Everything a worker needs to train one job, as enqueue resolved it.

    Attributes:
        hero: the hero profile as it was at enqueue (a snapshot, not a reference to the file).
        model_path: where the model loads from: a directory, or the hub name (``hero.hf_name``).
        config: the resolved training config; ``config_hash`` is its hash.
        queue: how the queue treats the job (attempts, preemption); not part of the hash.
        sources: for every dotted key (training and queue), the layer that set its value.
        origins: for every layer that took part, where it came from (a file, ``--set``, ``campaign.json``).
        sets: the job's own ``--set KEY=VALUE`` pairs, as typed.
        locked: the locked architecture block the hero resolved to.
        config_hash: ``sha256:`` + 16 hex digits of the canonical training config.
        git_commit: the code that resolved the plan (``+dirty`` with uncommitted changes), None outside git.
        resolved_at: when (ISO-8601 UTC).
    """

    hero: Hero
    model_path: str
    config: TrainerConfig
    queue: QueueConfig
    sources: dict[str, str]
    origins: dict[str, str]
    sets: dict[str, str]
    locked: dict[str, Any]
    config_hash: str
    git_commit: str | None
    resolved_at: str = field(default_factory=utc_now)

    @property
    def hub_name(self) -> str:
        return self.hero.hf_name

    def check_locked(self, campaign_id: str, campaign_locked: dict[str, Any]) -> None:
        """Raise PlanMismatch naming every field where the plan's locked block differs from the campaign's."""
        diffs = locked_differences(campaign_locked, self.locked)
        if diffs:
            raise PlanMismatch(f"the locked architecture differs from campaign {campaign_id}'s: " + "; ".join(diffs)
                               + ". Start a new campaign for the changed hero.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "hero": dataclasses.asdict(self.hero), "model_path": self.model_path, "hub_name": self.hub_name,
            "config": self.config.to_dict(), "queue": dataclasses.asdict(self.queue),
            "sources": dict(self.sources), "origins": dict(self.origins), "sets": dict(self.sets),
            "locked": dict(self.locked), "config_hash": self.config_hash, "git_commit": self.git_commit,
            "resolved_at": self.resolved_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPlan:
        config = data["config"]
        hero_fields = {f.name for f in dataclasses.fields(Hero)}  # a plan written by another version of Guild
        return cls(
            hero=Hero(**{k: v for k, v in data["hero"].items() if k in hero_fields}), model_path=data["model_path"],
            config=TrainerConfig.from_flat({f"{g}.{k}": v for g, values in config.items() for k, v in values.items()}),
            queue=QueueConfig(**data["queue"]), sources=dict(data["sources"]), origins=dict(data["origins"]),
            sets=dict(data["sets"]), locked=dict(data["locked"]), config_hash=data["config_hash"],
            git_commit=data.get("git_commit"), resolved_at=data.get("resolved_at") or utc_now(),
        )


def resolve_plan(guild_home: Path, hero: Hero, campaign_id: str, campaign_overrides: dict[str, Any] | None,
                 sets: dict[str, str] | None) -> JobPlan:
    """Resolve the five config layers, the model and the locked block for a job of ``hero`` in a campaign.

    Raises:
        ConfigError: listing every bad key of every layer.
    """
    resolved = resolve_job_config(guild_home, hero, campaign_overrides, sets,
                                  campaign_origin=f"campaign {campaign_id} (campaign.json)")
    model_path = hero.model_path(guild_home)
    locked = build_locked_config(hero, model_path, resolved.config.hyperparams.max_length, hero.version,
                                 finetune=resolved.config.finetune)
    return JobPlan(hero=hero, model_path=model_path, config=resolved.config, queue=resolved.queue,
                   sources=dict(resolved.sources), origins=dict(resolved.origins), sets=dict(sets or {}),
                   locked=locked, config_hash=resolved.config.config_hash(), git_commit=git_commit())
