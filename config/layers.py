"""Config precedence with provenance.

Layers, later wins:
  1. ``defaults``  — the schema defaults (:mod:`config.schema`)
  2. ``hero``      — the hero profile's ``training_defaults``
  3. ``campaign``  — the campaign's ``config_overrides`` (``campaign.json``)
  4. ``project``   — ``$GUILD_HOME/config.json``
  5. ``cli``       — per-job ``--set KEY=VALUE``

A layer may name a field by its dotted name (``hyperparams.learning_rate``), nested
(``{"hyperparams": {"learning_rate": ...}}``) or by its bare last part when that is unambiguous
(``learning_rate``); ``finetune: lora`` is short for ``finetune.mode: lora``. Every problem of every layer is
collected and raised together as one ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.errors import ConfigError
from config.schema import (
    QUEUE_GROUP,
    SHORTHANDS,
    QueueConfig,
    TrainerConfig,
    check_config,
    check_range,
    coerce,
    field_specs,
)

LAYERS = ("defaults", "hero", "campaign", "project", "cli")


@dataclass(frozen=True)
class Layer:
    """One source of overrides.

    Attributes:
        name: one of :data:`LAYERS`.
        values: the overrides as read (nested or flat).
        origin: where they came from, for error messages (a file path, or "--set").
        from_text: values are strings to parse (``--set``) rather than typed JSON/YAML values.
    """

    name: str
    values: dict[str, Any]
    origin: str
    from_text: bool = False


@dataclass(frozen=True)
class ResolvedConfig:
    """The resolved training config and queue settings, with the layer that set each dotted field.

    Attributes:
        config: the training config (what ``config_hash`` covers).
        queue: the queue settings, resolved through the same layers but kept outside the training config.
        sources: dotted key → the layer that set its value ("defaults", "hero", "campaign", "project", "cli").
        origins: layer → where it came from (a file path, ``--set``, the campaign record).
    """

    config: TrainerConfig
    sources: dict[str, str]
    queue: QueueConfig = field(default_factory=QueueConfig)
    origins: dict[str, str] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every dotted key (training and queue) with its value."""
        queue = {f"{QUEUE_GROUP}.{k}": v for k, v in dataclasses.asdict(self.queue).items()}
        return {**self.config.flat(), **queue}

    def explain(self) -> dict[str, dict[str, Any]]:
        flat = self.flat()
        return {k: {"value": flat[k], "source": self.sources[k]} for k in flat}


def canonical_key(key: str) -> str:
    """Map a dotted or bare key to its dotted name. Raises KeyError (with a hint) when unknown/ambiguous."""
    specs = field_specs()
    if key in specs:
        return key
    if key in SHORTHANDS:
        return SHORTHANDS[key]
    matches = [d for d in specs if d.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise KeyError(f"{key!r} is ambiguous: say one of {', '.join(matches)}")
    raise KeyError(f"unknown key {key!r} (python -m config explain lists every key)")


def _flatten(values: dict[str, Any]) -> list[tuple[str, Any]]:
    groups = {d.split(".", 1)[0] for d in field_specs()}
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if key in groups and isinstance(value, dict):
            out.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            out.append((key, value))
    return out


def parse_set_args(pairs: list[str] | None) -> dict[str, str]:
    """``["lr=1", "a.b=2"]`` → ``{"lr": "1", "a.b": "2"}``; raises ConfigError for a pair without '='."""
    out: dict[str, str] = {}
    problems = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {pair!r}: expected KEY=VALUE, for example --set learning_rate=1e-5")
            continue
        out[key.strip()] = value
    if problems:
        raise ConfigError(problems)
    return out


def resolve(layers: list[Layer]) -> ResolvedConfig:
    """Apply ``layers`` in order over the schema defaults. Raises ConfigError listing every problem."""
    specs = field_specs()
    values = {d: s.default for d, s in specs.items()}
    sources = {d: "defaults" for d in specs}
    origins = {"defaults": "config/schema.py"}
    problems: list[str] = []
    for layer in layers:
        if layer.name not in LAYERS:
            raise ValueError(f"unknown layer {layer.name!r}")
        origins[layer.name] = layer.origin
        if not isinstance(layer.values, dict):
            problems.append(f"{layer.origin} ({layer.name} layer): expected a mapping of keys to values")
            continue
        for key, raw in _flatten(layer.values):
            where = f"{layer.origin} ({layer.name} layer), key {key!r}"
            try:
                dotted = canonical_key(key)
            except KeyError as exc:
                problems.append(f"{where}: {exc.args[0]}")
                continue
            try:
                value = coerce(specs[dotted], raw, layer.from_text)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            bad = check_range(dotted, value)
            if bad:
                problems.append(f"{where}: {bad}")
                continue
            values[dotted] = value
            sources[dotted] = layer.name
    if problems:
        raise ConfigError(problems)
    queue = QueueConfig(**{d.split(".", 1)[1]: v for d, v in values.items() if d.startswith(QUEUE_GROUP + ".")})
    training = {d: v for d, v in values.items() if not d.startswith(QUEUE_GROUP + ".")}
    config = TrainerConfig.from_flat(training)
    problems = check_config(config, sources)
    if problems:
        raise ConfigError(problems)
    return ResolvedConfig(config, sources, queue, origins)


def read_project_layer(guild_home: Path) -> Layer | None:
    """The ``project`` layer from ``$GUILD_HOME/config.json``, or None when there is no such file."""
    path = guild_home / "config.json"
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: invalid JSON: {exc.msg}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"{path}: expected a JSON object of config keys"])
    return Layer("project", values, str(path))


def resolve_job_config(guild_home: Path, hero: Any | None, campaign_overrides: dict[str, Any] | None,
                       cli_sets: dict[str, str] | None, campaign_origin: str = "campaign.json") -> ResolvedConfig:
    """Resolve the five layers for one job (or for ``explain``).

    Args:
        hero: a :class:`heroes.profile.Hero` (its ``training_defaults`` are the hero layer) or None.
        campaign_overrides: the campaign's ``config_overrides`` or None.
        cli_sets: ``--set`` pairs as parsed by :func:`parse_set_args`.
    """
    layers: list[Layer] = []
    if hero is not None:
        layers.append(Layer("hero", hero.training_defaults, hero.source))
    if campaign_overrides:
        layers.append(Layer("campaign", campaign_overrides, campaign_origin))
    project = read_project_layer(guild_home)
    if project is not None:
        layers.append(project)
    if cli_sets:
        layers.append(Layer("cli", dict(cli_sets), "--set", from_text=True))
    return resolve(layers)
