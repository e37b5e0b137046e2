"""Make a hero's model loadable: build the offline test hero on first use, or find hub weights locally."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from heroes.errors import HeroError
from heroes.profile import Hero

logger = logging.getLogger(__name__)

_BUILDERS = ("tiny-qwen3",)


def ensure_model(hero: Hero, guild_home: Path) -> str:
    """Return a path (or hub name found in the local cache) ``from_pretrained`` can load offline.

    Raises:
        HeroError: the weights are nowhere on this machine; the message says how to get them.
    """
    if hero.local_path:
        path = Path(hero.local_path).expanduser()
        if not (path / "config.json").exists():
            raise HeroError(f"hero {hero.id}: model.local_path {path} holds no config.json; "
                            f"download {hero.hf_name} there or fix the path in {hero.source}")
        return str(path)
    if hero.builder:
        return str(_ensure_built(hero, guild_home))
    return _find_in_hf_cache(hero)


def _ensure_built(hero: Hero, guild_home: Path) -> Path:
    if hero.builder not in _BUILDERS:
        raise HeroError(f"{hero.source}: key 'model.builder': unknown builder {hero.builder!r}")
    target = guild_home / "heroes" / hero.id
    if (target / "config.json").exists():
        return target
    from heroes.tiny import build_tiny_qwen3

    # Build beside the target and rename: two workers building at once both succeed, one rename wins,
    # and a crash mid-build never leaves a directory that looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hero.id}-", dir=target.parent))
    try:
        build_tiny_qwen3(tmp / "model", vocab_size=hero.vocab_size, context_length=hero.context_length)
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find_in_hf_cache(hero: Hero) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hero.hf_name, revision=hero.version or None, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here means "not available offline"
        pass
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hero.hf_name, revision=hero.version or None)
    except Exception as exc:  # noqa: BLE001
        raise HeroError(
            f"hero {hero.id}: the weights of {hero.hf_name} are not on this machine and could not be downloaded "
            f"({type(exc).__name__}). Fetch them where there is internet (`huggingface-cli download "
            f"{hero.hf_name}`) and copy the HF cache here, or set model.local_path in {hero.source}"
        ) from None
