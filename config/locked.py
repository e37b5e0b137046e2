"""The locked architecture block: what a campaign's checkpoints are bound to.

It is built here and only here, stored with the campaign when it is created, and compared with what every
later job resolves: a hero edited to another architecture fails its job before training.

The finetune mode is part of it: a campaign's checkpoints are either whole models or adapters of one rank over
given modules, and a job that resolves another mode (full <-> lora <-> qlora), rank, alpha or target modules
fails the same way instead of silently training something else. Blocks stored before these fields existed
are full fine-tuning (:data:`LOCKED_DEFAULTS`).
"""

from __future__ import annotations

from typing import Any

# Documented fallback when no hero profile is given (a bare model path): nothing is known but the path.
FALLBACK_ARCHITECTURE = "unknown"
FALLBACK_VOCAB_SIZE = 0
FINETUNE_FIELDS = ("finetune_mode", "lora_rank", "lora_alpha", "lora_target_modules")
LOCKED_FIELDS = ("base_model", "model_architecture", "max_context_length", "vocab_size", "model_version",
                 *FINETUNE_FIELDS)
# What a block without the finetune fields means: every campaign created before they existed trained fully.
LOCKED_DEFAULTS = {"finetune_mode": "full", "lora_rank": None, "lora_alpha": None, "lora_target_modules": None}


def build_locked_config(hero: Any, model_path: str | None, max_length: int | None,
                        model_version: str | None, finetune: Any = None) -> dict[str, Any]:
    """The locked block of a campaign.

    Args:
        hero: a :class:`heroes.profile.Hero` or None.
        model_path: where the model loads from (used as ``base_model`` when there is no hero).
        max_length: the resolved ``hyperparams.max_length`` (used when there is no hero).
        model_version: the model revision (the hero's ``model.version`` wins when set).
        finetune: the resolved :class:`config.schema.FinetuneConfig`; None leaves the finetune fields out, which
            compares as full fine-tuning (:data:`LOCKED_DEFAULTS`).

    Returns:
        ``{base_model, model_architecture, max_context_length, vocab_size, model_version}`` plus, when
        ``finetune`` is given, ``{finetune_mode, lora_rank, lora_alpha, lora_target_modules}`` (the adapter
        fields are None for full fine-tuning).
    """
    block = _architecture_block(hero, model_path, max_length, model_version)
    if finetune is not None:
        block.update(finetune_block(finetune))
    return block


def finetune_block(finetune: Any) -> dict[str, Any]:
    """The finetune part of the locked block for a :class:`config.schema.FinetuneConfig`."""
    if finetune.mode == "full":
        return dict(LOCKED_DEFAULTS)
    return {"finetune_mode": finetune.mode, "lora_rank": finetune.lora_rank, "lora_alpha": finetune.lora_alpha,
            "lora_target_modules": finetune.lora_target_modules}


def _architecture_block(hero: Any, model_path: str | None, max_length: int | None,
                        model_version: str | None) -> dict[str, Any]:
    if hero is not None:
        return {
            "base_model": hero.hf_name,
            "model_architecture": hero.architecture,
            "max_context_length": hero.context_length,
            "vocab_size": hero.vocab_size,
            "model_version": hero.version or model_version,
        }
    return {
        "base_model": model_path,
        "model_architecture": FALLBACK_ARCHITECTURE,
        "max_context_length": max_length,
        "vocab_size": FALLBACK_VOCAB_SIZE,
        "model_version": model_version,
    }


def locked_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["vocab_size: campaign has 4096, job resolves 8192", ...]`` for every differing field.

    A finetune field missing from either block counts as its :data:`LOCKED_DEFAULTS` value (full fine-tuning).
    """
    def value(block: dict[str, Any], key: str) -> Any:
        return block.get(key, LOCKED_DEFAULTS.get(key))

    return [f"{k}: campaign has {value(stored, k)!r}, job resolves {value(current, k)!r}"
            for k in LOCKED_FIELDS if value(stored, k) != value(current, k)]
