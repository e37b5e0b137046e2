"""Campaign records on disk: ``$GUILD_HOME/campaigns/<hero>/<name>/campaign.json``.

Beside it live the campaign's checkpoints (``checkpoints/<job>/step-N``). Every read-modify-write of
``campaign.json`` holds an exclusive ``flock`` and replaces the file atomically (temp file + rename), so
concurrent enqueues and a finishing job never lose each other's changes, also on shared storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaigns.errors import CampaignError, UnknownCampaign
from config.clock import utc_now
from config.code_version import git_commit
from config.errors import GuildError
from config.files import exclusive_lock
from config.layers import resolve_job_config
from config.locked import build_locked_config
from heroes.profile import DEFAULT_HERO, Hero, load_hero

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(name: str) -> str:
    """Return ``name`` when it is a valid campaign name, else raise CampaignError saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CampaignError(f"campaign name {name!r} is not valid: use 1-64 letters, digits, '-' or '_'")
    return name


def default_campaign_name(hero_id: str) -> str:
    """The campaign a job joins when it names none: ``main-<hero>``."""
    return "main-" + re.sub(r"[^A-Za-z0-9_-]", "_", hero_id)


@dataclass
class Campaign:
    """One long training run of one hero."""

    id: str
    hero_id: str
    created_at: str = field(default_factory=utc_now)
    status: str = "active"
    code_version: str | None = None
    config_hash: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    locked: dict[str, Any] = field(default_factory=dict)
    current_step: int = 0
    latest_checkpoint: str | None = None
    job_ids: list[str] = field(default_factory=list)
    retention: dict[str, Any] = field(default_factory=dict)  # checkpoint policy; see jobs.retention
    eval_sets: list[dict[str, Any]] = field(default_factory=list)  # eval set history; see campaigns.eval_set

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Campaign:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class CampaignStore:
    """Campaigns under ``$GUILD_HOME/campaigns``."""

    def __init__(self, guild_home: Path):
        self.root = Path(guild_home) / "campaigns"

    def directory(self, hero_id: str, name: str) -> Path:
        check_name(name)
        path = (self.root / hero_id / name).resolve()
        if self.root.resolve() not in path.parents:
            raise CampaignError(f"campaign {name!r} of hero {hero_id!r} would live outside {self.root}")
        return path

    def checkpoint_root(self, campaign: Campaign) -> Path:
        return self.directory(campaign.hero_id, campaign.id) / "checkpoints"

    def find_dir(self, name: str) -> Path | None:
        check_name(name)
        matches = sorted(self.root.glob(f"*/{name}/campaign.json")) if self.root.exists() else []
        return matches[0].parent if matches else None

    def exists(self, name: str) -> bool:
        return self.find_dir(name) is not None

    def get(self, name: str) -> Campaign:
        path = self.find_dir(name)
        if path is None:
            raise UnknownCampaign(f"no campaign named {name!r}; create it with "
                                  f"`python -m campaigns create {name} --hero HERO` (python -m campaigns list)")
        return self._read(path / "campaign.json")

    def _read(self, path: Path) -> Campaign:
        try:
            return Campaign.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise CampaignError(f"{path}: unreadable campaign record ({exc}); restore it from a backup") from None

    def list(self) -> list[Campaign]:
        if not self.root.exists():
            return []
        return [self._read(p) for p in sorted(self.root.glob("*/*/campaign.json"))]

    def create(self, campaign: Campaign) -> Campaign:
        """Write a new campaign. Raises CampaignError when the name is taken (by any hero)."""
        existing = self.find_dir(campaign.id)
        if existing is not None:
            raise CampaignError(f"campaign {campaign.id!r} already exists ({existing}); pick another name")
        directory = self.directory(campaign.hero_id, campaign.id)
        directory.mkdir(parents=True, exist_ok=True)
        with self._locked(directory):
            if (directory / "campaign.json").exists():
                raise CampaignError(f"campaign {campaign.id!r} already exists ({directory})")
            self._write(directory / "campaign.json", campaign)
        return campaign

    @contextlib.contextmanager
    def edit(self, name: str) -> Iterator[Campaign]:
        """Read, let the caller change, and atomically write back one campaign, under an exclusive lock."""
        directory = self.find_dir(name)
        if directory is None:
            raise UnknownCampaign(f"no campaign named {name!r}")
        with self._locked(directory):
            campaign = self._read(directory / "campaign.json")
            yield campaign
            self._write(directory / "campaign.json", campaign)

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        with exclusive_lock(directory / ".lock"):
            yield

    @staticmethod
    def _write(path: Path, campaign: Campaign) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".campaign-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(campaign.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------------------------------------------- founding


def new_campaign(guild_home: Path, hero: Hero, name: str, overrides: dict[str, Any]) -> Campaign:
    """The record of a new campaign of ``hero`` with ``overrides`` (its config layer): config hash and locked block
    as they resolve now. Raises CampaignError (bad name) or ConfigError (bad overrides)."""
    check_name(name)
    resolved = resolve_job_config(guild_home, hero, overrides, None, campaign_origin=f"campaign {name}")
    locked = build_locked_config(hero, hero.model_path(guild_home), resolved.config.hyperparams.max_length,
                                 hero.version, finetune=resolved.config.finetune)
    return Campaign(id=name, hero_id=hero.id, code_version=git_commit(), config_hash=resolved.config.config_hash(),
                    config_overrides=overrides, locked=locked)


def create_campaign(guild_home: Path, hero: Hero, name: str, overrides: dict[str, Any]) -> Campaign:
    """Create and write a campaign of ``hero``. Raises CampaignError when the name is taken."""
    return CampaignStore(guild_home).create(new_campaign(guild_home, hero, name, overrides))


@dataclass(frozen=True)
class Target:
    """Where a submission goes: the hero, and the campaign (None when it does not exist yet) and its name."""

    hero: Hero
    campaign: Campaign | None
    name: str


def find_target(guild_home: Path, hero_id: str | None, campaign_name: str | None) -> Target:
    """The hero and campaign a submission goes to; nothing is created here.

    An existing campaign decides the hero (``--hero`` must agree); without ``--campaign`` a job joins its hero's
    default campaign ``main-<hero>``.

    Raises:
        CampaignError, HeroError (unknown hero), GuildError (hero and campaign disagree).
    """
    store = CampaignStore(guild_home)
    existing = None
    if campaign_name is not None:
        check_name(campaign_name)
        if store.exists(campaign_name):
            existing = store.get(campaign_name)
            if hero_id is not None and hero_id != existing.hero_id:
                raise GuildError(f"campaign {campaign_name} trains hero {existing.hero_id}, not {hero_id}; "
                                 f"drop --hero or pick another campaign")
            hero_id = existing.hero_id
    hero = load_hero(hero_id or DEFAULT_HERO, guild_home)
    name = campaign_name or default_campaign_name(hero.id)
    if existing is None and store.exists(name):
        existing = store.get(name)
    return Target(hero, existing, name)


def join_or_create(guild_home: Path, target: Target) -> Campaign:
    """The campaign of ``target``: the existing one, else a new one; a concurrent submitter may create it first,
    and then this one joins it."""
    if target.campaign is not None:
        return target.campaign
    try:
        return create_campaign(guild_home, target.hero, target.name, {})
    except CampaignError:
        store = CampaignStore(guild_home)
        if not store.exists(target.name):
            raise
        campaign = store.get(target.name)  # created by another submission a moment ago: join it
        if campaign.hero_id != target.hero.id:
            raise GuildError(f"campaign {target.name} trains hero {campaign.hero_id}, not {target.hero.id}") from None
        return campaign
