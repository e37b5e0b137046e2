"""The locked architecture block: what a campaign's checkpoints are bound to.

It is built here and only here, stored with the campaign when it is created, and compared with what every
later job resolves: a hero edited to another architecture fails its job before training.
"""

from __future__ import annotations

from typing import Any

# Documented fallback when no hero profile is given (a bare model path): nothing is known but the path.
FALLBACK_ARCHITECTURE = "unknown"
FALLBACK_VOCAB_SIZE = 0
LOCKED_FIELDS = ("base_model", "model_architecture", "max_context_length", "vocab_size", "model_version")


def build_locked_config(hero: Any, model_path: str | None, max_length: int | None,
                        model_version: str | None) -> dict[str, Any]:
    """The locked block of a campaign.

    Args:
        hero: a :class:`heroes.profile.Hero` or None.
        model_path: where the model loads from (used as ``base_model`` when there is no hero).
        max_length: the resolved ``hyperparams.max_length`` (used when there is no hero).
        model_version: the model revision (the hero's ``model.version`` wins when set).

    Returns:
        ``{base_model, model_architecture, max_context_length, vocab_size, model_version}``.
    """
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
    """``["vocab_size: campaign has 4096, job resolves 8192", ...]`` for every differing field."""
    return [f"{k}: campaign has {stored.get(k)!r}, job resolves {current.get(k)!r}"
            for k in LOCKED_FIELDS if stored.get(k) != current.get(k)]
