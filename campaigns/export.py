"""Export what a campaign trained as a plain Hugging Face model directory, loadable without Guild.

``python -m campaigns export NAME OUT [--merged] [--checkpoint PATH]`` writes, from the campaign's latest checkpoint
(or ``--checkpoint``):

* **full** fine-tuning: the model (``model.safetensors``, ``config.json``, ``generation_config.json``) with its
  tokenizer and chat template: ``AutoModelForCausalLM.from_pretrained(OUT)`` / ``AutoTokenizer.from_pretrained(OUT)``;
* **LoRA/QLoRA**, by default: the adapter alone (``adapter_model.safetensors``, ``adapter_config.json``) with the
  tokenizer: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)``, where BASE (the hero's
  hub name, or its local directory) is in ``adapter_config.json`` and ``guild_export.json``;
* **LoRA/QLoRA with** ``--merged``: the adapter merged into the base, a plain model like a full export.

Every export also holds ``guild_export.json`` (campaign, hero, step, checkpoint, mode, base). The directory is
built beside OUT and renamed into place, so OUT is either complete or absent; an existing non-empty OUT is refused.
Guild's own checkpoint files (optimizer, RNG, trainer state) are not exported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from campaigns.campaign import CampaignStore
from campaigns.errors import ExportError
from config.files import fsync_path

logger = logging.getLogger(__name__)

EXPORT_INFO = "guild_export.json"
# A checkpoint's own files: training state that means nothing to a model user.
_GUILD_FILES = ("optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json", "trainer_state.json",
                "COMPLETE")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class ExportResult:
    """What was written: ``kind`` is "full", "adapter" or "merged"; ``base_model`` is what an adapter loads on."""

    path: str
    kind: str
    campaign: str
    hero: str
    step: int
    checkpoint: str
    finetune_mode: str
    base_model: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_campaign(guild_home: Path, name: str, out: str | Path, merged: bool = False,
                    checkpoint: str | Path | None = None) -> ExportResult:
    """Export campaign ``name``'s latest checkpoint (or ``checkpoint``) to ``out``.

    Raises:
        ExportError: OUT exists and is not empty, the campaign has no checkpoint, the checkpoint is not this
            campaign's or is incomplete, or loading the base/adapter for ``merged`` failed. Nothing is left behind.
        UnknownCampaign: no such campaign.
    """
    from engine.errors import EngineError

    campaign = CampaignStore(guild_home).get(name)
    source = _checkpoint_of(campaign, checkpoint)
    out = Path(out).expanduser().absolute()
    _check_target(out)
    try:
        from engine.checkpoint import read_checkpoint_state

        state = read_checkpoint_state(source)
    except EngineError as exc:
        raise ExportError(f"{exc}") from None
    mode = ((state.get("config") or {}).get("finetune") or {}).get("mode", "full")
    adapter = mode != "full"
    kind = "merged" if adapter and merged else "adapter" if adapter else "full"
    if merged and not adapter:
        logger.info("--merged: %s is a full fine-tuning checkpoint, already a whole model", source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        base = None
        if kind == "full":
            _copy_files(source, tmp, exclude=_GUILD_FILES)
        elif kind == "adapter":
            base = _portable_base(guild_home, campaign.hero_id, state)
            _copy_files(source, tmp, exclude=_GUILD_FILES)
            _rewrite_base(tmp / "adapter_config.json", base)
        else:
            base = _local_base(guild_home, campaign.hero_id, state)
            _write_merged(base, source, tmp)
        result = ExportResult(path=str(out), kind=kind, campaign=campaign.id, hero=campaign.hero_id,
                              step=int(state["global_step"]), checkpoint=str(source), finetune_mode=mode,
                              base_model=base)
        (tmp / EXPORT_INFO).write_text(json.dumps({**result.to_dict(), "exported_at": time.time()}, indent=1))
        _fsync_tree(tmp)
        if out.exists():  # an empty directory (checked above): replace it
            out.rmdir()
        os.rename(tmp, out)
    except EngineError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"{exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported campaign %s step %d (%s) to %s", campaign.id, result.step, kind, out)
    return result


# ------------------------------------------------------------------------------------------------ internals


def _checkpoint_of(campaign, checkpoint: str | Path | None) -> Path:
    if checkpoint is None:
        if not campaign.latest_checkpoint:
            raise ExportError(f"campaign {campaign.id} has no checkpoint yet: train a job first "
                              f"(python -m enqueue FILE --campaign {campaign.id} --wait), or pass --checkpoint PATH")
        return Path(campaign.latest_checkpoint)
    path = Path(checkpoint).expanduser().absolute()
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: no such directory; list the campaign's checkpoints with "
                          f"python -m campaigns show {campaign.id}")
    return path


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: export into a new directory, or remove it first")


def _copy_files(source: Path, target: Path, exclude: tuple[str, ...]) -> None:
    for entry in sorted(source.iterdir()):
        if entry.is_file() and entry.name not in exclude:
            shutil.copy2(entry, target / entry.name)


def _portable_base(guild_home: Path, hero_id: str, state: dict[str, Any]) -> str:
    """What an adapter export names as its base: the hub name of a hub hero, else the local model directory."""
    from heroes.profile import load_hero

    try:
        hero = load_hero(hero_id, guild_home)
    except Exception:  # noqa: BLE001 - a hero removed since: the path training used is the best we know
        return str(state.get("model_path"))
    if hero.builder or hero.local_path:
        return str(state.get("model_path") or hero.model_path(guild_home))
    return hero.hf_name


def _local_base(guild_home: Path, hero_id: str, state: dict[str, Any]) -> str:
    """A local directory (or cached hub name) holding the base weights the adapter was trained on."""
    trained_on = state.get("model_path")
    if trained_on and (Path(trained_on) / "config.json").is_file():
        return str(trained_on)
    from heroes.materialise import ensure_model
    from heroes.profile import load_hero

    return ensure_model(load_hero(hero_id, guild_home), guild_home)


def _rewrite_base(config_path: Path, base: str) -> None:
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _write_merged(base: str, adapter_dir: Path, target: Path) -> None:
    from engine.adapters import merge_adapter

    model = merge_adapter(base, adapter_dir)
    model.save_pretrained(target, safe_serialization=True)
    _copy_files(adapter_dir, target, exclude=_GUILD_FILES + _ADAPTER_FILES)


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.iterdir(), directory]:
        with contextlib.suppress(OSError):
            fsync_path(path)
