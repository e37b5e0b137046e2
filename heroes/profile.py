"""Hero profiles: what model a hero is and how it trains by default.

A profile is a YAML file in ``heroes/`` (or in ``$GUILD_HOME/heroes`` for local additions)::

    id: tiny-qwen3
    name: ...
    model: {hf_name, architecture, vocab_size, context_length, [builder], [local_path], [version], [shape]}
    # shape: {hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size, tied_embeddings},
    #   for memory estimates before anything loads (heroes.memory)
    training_defaults: {hyperparams: {...}, data: {...}, ...}     # the "hero" config layer
    chat: {template: chatml | model, thinking: keep | strip}             # see CHAT_KEYS
    throughput: {cpu_tokens_per_sec, gpu_tokens_per_sec}          # ETA fallback until a job is measured
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.chat_turns import THINKING_MODES, ChatOptions
from heroes.errors import HeroError, UnknownHero
from heroes.memory import ModelShape, parse_shape

PROFILE_DIR = Path(__file__).resolve().parent
HERO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REQUIRED_MODEL_KEYS = {"hf_name": str, "architecture": str, "vocab_size": int, "context_length": int}
_OPTIONAL_MODEL_KEYS = {"builder": str, "local_path": str, "version": str, "shape": dict}
_TOP_KEYS = {"id", "name", "model", "training_defaults", "chat", "throughput", "description"}
# The chat section: which template renders conversations (informative: the engine always uses the one saved with
# the model's tokenizer, ChatML for the tiny hero) and what becomes of the empty think block a Qwen3-style template
# writes before the last reply (engine.chat_turns explains both choices).
CHAT_KEYS = {"template": ("chatml", "model"), "thinking": THINKING_MODES}


@dataclass(frozen=True)
class Hero:
    """One validated hero profile."""

    id: str
    name: str
    hf_name: str
    architecture: str
    vocab_size: int
    context_length: int
    source: str
    builder: str | None = None
    local_path: str | None = None
    version: str | None = None
    training_defaults: dict[str, Any] = field(default_factory=dict)
    chat: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    shape: ModelShape | None = None

    @property
    def chat_options(self) -> ChatOptions:
        """How the engine renders this hero's conversations (``chat.thinking``; ``keep`` unless set)."""
        return ChatOptions(thinking=self.chat.get("thinking", "keep"))

    def local_tokenizer_dir(self, guild_home: Path) -> Path | None:
        """The directory holding this hero's ``tokenizer.json`` on this machine, or None when the model is not
        here yet (the tiny hero is built by its first job; a hub hero may not be downloaded). Builds and downloads
        nothing, and needs neither torch nor transformers: for counting tokens at enqueue time."""
        if self.local_path or self.builder:
            path = Path(self.model_path(guild_home))
            return path if (path / "tokenizer.json").is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.hf_name, "tokenizer.json", revision=self.version or None)
        except Exception:  # noqa: BLE001 - a broken cache reads as "not here"
            return None
        return Path(found).parent if isinstance(found, str) else None

    def model_path(self, guild_home: Path) -> str:
        """Where the model loads from: a local directory, or the hub name for the HF cache."""
        if self.local_path:
            return str(Path(self.local_path).expanduser())
        if self.builder:
            return str(guild_home / "heroes" / self.id)
        return self.hf_name

    def to_dict(self, guild_home: Path | None = None) -> dict[str, Any]:
        data = {
            "id": self.id, "name": self.name, "source": self.source,
            "model": {"hf_name": self.hf_name, "architecture": self.architecture, "vocab_size": self.vocab_size,
                      "context_length": self.context_length, "builder": self.builder,
                      "local_path": self.local_path, "version": self.version},
            "training_defaults": self.training_defaults, "chat": self.chat, "throughput": self.throughput,
        }
        if self.shape is not None:
            data["model"]["shape"] = {k: v for k, v in dataclasses.asdict(self.shape).items()
                                     if k not in ("vocab_size", "qk_norm")}
        if guild_home is not None:
            data["model_path"] = self.model_path(guild_home)
        return data


def _check(cond: bool, source: str, key: str, what: str, problems: list[str]) -> bool:
    if not cond:
        problems.append(f"{source}: key '{key}': {what}")
    return cond


def parse_profile(text: str, source: str) -> Hero:
    """Validate one profile's YAML text. Raises HeroError naming the file and every bad key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise HeroError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise HeroError(f"{source}: expected a mapping with keys id, name, model, training_defaults")
    problems: list[str] = []
    for key in data:
        _check(key in _TOP_KEYS, source, str(key), f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}", problems)
    hero_id = data.get("id")
    if _check(isinstance(hero_id, str), source, "id", "missing or not a string", problems):
        _check(bool(HERO_ID_RE.match(hero_id)), source, "id", "use letters, digits, '.', '-', '_' only", problems)
    model = data.get("model")
    if _check(isinstance(model, dict), source, "model", "missing or not a mapping", problems):
        for key, typ in _REQUIRED_MODEL_KEYS.items():
            _check(isinstance(model.get(key), typ) and not isinstance(model.get(key), bool), source, f"model.{key}",
                   f"missing or not a {typ.__name__}", problems)
        for key, typ in _OPTIONAL_MODEL_KEYS.items():
            if model.get(key) is not None:
                _check(isinstance(model[key], typ), source, f"model.{key}", f"not a {typ.__name__}", problems)
        allowed = set(_REQUIRED_MODEL_KEYS) | set(_OPTIONAL_MODEL_KEYS)
        for key in model:
            _check(key in allowed, source, f"model.{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}",
                   problems)
    for key in ("training_defaults", "chat", "throughput"):
        if data.get(key) is not None:
            _check(isinstance(data[key], dict), source, key, "not a mapping", problems)
    if isinstance(data.get("chat"), dict):
        for key, value in data["chat"].items():
            allowed = CHAT_KEYS.get(key)
            if _check(allowed is not None, source, f"chat.{key}",
                      f"unknown key; allowed: {', '.join(sorted(CHAT_KEYS))}", problems):
                _check(value in allowed, source, f"chat.{key}",
                       f"must be one of {', '.join(allowed)}, not {value!r}", problems)
    shape = None
    if isinstance(model, dict) and isinstance(model.get("shape"), dict):
        shape = parse_shape(model["shape"], model.get("vocab_size"), source, problems)
    if problems:
        raise HeroError("\n".join(problems))
    version = model.get("version")
    return Hero(
        id=hero_id, name=str(data.get("name") or hero_id), hf_name=model["hf_name"],
        architecture=model["architecture"], vocab_size=model["vocab_size"], context_length=model["context_length"],
        source=source, builder=model.get("builder"), local_path=model.get("local_path"),
        version=None if version is None else str(version),
        training_defaults=dict(data.get("training_defaults") or {}), chat=dict(data.get("chat") or {}),
        throughput=dict(data.get("throughput") or {}), shape=shape,
    )


def profile_dirs(guild_home: Path | None) -> list[Path]:
    dirs = [PROFILE_DIR]
    if guild_home is not None and (guild_home / "heroes").is_dir():
        dirs.append(guild_home / "heroes")
    return dirs


def _profile_files(guild_home: Path | None) -> list[Path]:
    files: list[Path] = []
    for d in profile_dirs(guild_home):
        files.extend(sorted(p for p in d.glob("*.yaml") if p.is_file()))
    return files


def load_hero(hero_id: str, guild_home: Path | None = None) -> Hero:
    """The profile with ``id == hero_id``. Raises UnknownHero (listing the known ids) or HeroError."""
    if not isinstance(hero_id, str) or not HERO_ID_RE.match(hero_id):
        raise UnknownHero(f"hero id {hero_id!r} is not valid: use letters, digits, '.', '-', '_' only")
    for path in _profile_files(guild_home):
        if path.stem == hero_id:
            hero = parse_profile(path.read_text(encoding="utf-8"), str(path))
            if hero.id != hero_id:
                raise HeroError(f"{path}: key 'id': {hero.id!r} differs from the file name {hero_id!r}")
            return hero
    known = ", ".join(p.stem for p in _profile_files(guild_home)) or "none"
    raise UnknownHero(f"unknown hero {hero_id!r}; known heroes: {known} (python -m heroes list)")


def list_heroes(guild_home: Path | None = None) -> tuple[list[Hero], list[str]]:
    """All valid profiles, plus one error line for each broken one."""
    heroes, errors = [], []
    for path in _profile_files(guild_home):
        try:
            heroes.append(parse_profile(path.read_text(encoding="utf-8"), str(path)))
        except (HeroError, OSError, UnicodeDecodeError) as exc:
            errors.append(str(exc))
    return heroes, errors


DEFAULT_HERO = "tiny-qwen3"
