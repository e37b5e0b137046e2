"""The typed trainer configuration: :class:`TrainerConfig` and its groups.

Every field has a type and a default; :func:`field_specs` lists them as dotted names
(``hyperparams.learning_rate``), which is how layers, ``--set`` and ``explain`` name them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, get_type_hints

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
FINETUNE_MODES = ("full", "lora", "qlora")
# Every linear projection of a Qwen3 (Llama-style) decoder layer: attention and MLP. "all-linear" also works.
QWEN3_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ATTENTION_PATHS = ("auto", "per_document", "flex", "flash_varlen", "sdpa_dense")  # engine.attention.AttentionPath
LOSS_KERNELS = ("auto", "chunked", "liger")  # engine.loss.LossKernel
SHARDINGS = ("none", "fsdp")  # engine.data_parallel: replicated (DDP) or sharded (FSDP2) over a worker's ranks
DECAYING_SCHEDULERS = ("linear", "cosine")


@dataclass(frozen=True)
class Hyperparams:
    """Optimisation hyperparameters. Steps are optimizer steps, counted across a whole campaign."""

    batch_size: int = 4  # rows per micro-batch on one rank (packed rows of max_length tokens when packing is on)
    gradient_accumulation_steps: int = 1  # used only when global_batch_size is 0 (see config.batching)
    global_batch_size: int = 0  # rows per optimizer step over all ranks; 0: batch_size x gradient_accumulation_steps
    learning_rate: float = 1e-3
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 10  # global steps: a campaign warms up once, not once per job
    decay_steps: int = 0  # for linear/cosine: the campaign step at which the LR reaches 0 (0: no decay)
    epochs: float = 1.0
    max_steps: int = 0  # steps per job; 0 means "as many as epochs need"
    max_length: int = 512
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, fp32 on the CPU
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    save_steps: int = 50
    save_total_limit: int = 2
    eval_fraction: float = 0.05
    eval_max_examples: int = 200
    eval_steps: int = 0  # 0: validate only at the end of each job
    eval_max_tokens: int = 500_000  # the most tokens a campaign's eval set may hold (per evaluation); 0: no limit
    seed: int = 42
    attention: str = "auto"  # how packed examples are kept apart (engine.attention); auto picks by device
    loss_kernel: str = "auto"  # lm_head + cross-entropy: chunked, or liger (auto: liger on CUDA when installed)
    deterministic: bool = False  # deterministic kernels, for bitwise resume on CUDA (slower; engine.determinism)
    sharding: str = "none"  # on a multi-GPU worker: none (DDP, replicated) or fsdp (weights/optimizer sharded)


@dataclass(frozen=True)
class DataConfig:
    """How examples become batches."""

    enable_packing: bool = True
    shuffle: bool = True


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings."""

    name: str = "adamw"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass(frozen=True)
class FinetuneConfig:
    """Which weights train: all of them (``full``), or a LoRA adapter over a frozen base (``lora``), or over a
    4-bit base (``qlora``, CUDA and bitsandbytes only). See :mod:`engine.adapters`."""

    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    lora_target_modules: str = QWEN3_LORA_TARGETS  # comma-separated module names (a YAML list works too)


@dataclass(frozen=True)
class QueueConfig:
    """How the queue treats a job. Set through the same layers as the training config (``queue.max_attempts``),
    but kept beside it, not inside: changing it does not change the training config or its hash."""

    max_attempts: int = 3  # runs a job may start in all (a pause or preemption does not count)
    preempt_low: bool = False  # a high job makes a running low job step aside when every worker runs one


@dataclass(frozen=True)
class TrainerConfig:
    """The resolved training configuration of one job (what the engine sees, and what ``config_hash`` covers)."""

    hyperparams: Hyperparams = field(default_factory=Hyperparams)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"hyperparams.learning_rate": 0.001, ...}``."""
        return {f"{g}.{k}": v for g, values in self.to_dict().items() for k, v in values.items()}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainerConfig:
        """Build from dotted names; values must already have their schema types (see :func:`coerce`)."""
        groups: dict[str, dict[str, Any]] = {}
        for dotted, value in values.items():
            group, name = dotted.split(".", 1)
            groups.setdefault(group, {})[name] = value
        kwargs = {}
        for f in dataclasses.fields(cls):
            kwargs[f.name] = f.default_factory(**groups.get(f.name, {}))  # type: ignore[misc]
        return cls(**kwargs)

    def config_hash(self) -> str:
        """``sha256:`` + 16 hex digits of the canonical JSON of the resolved config."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FieldSpec:
    dotted: str
    type: type
    default: Any


# Every group a config layer may set: the training config's, then "queue" beside it.
QUEUE_GROUP = "queue"


def config_groups() -> list[tuple[str, type]]:
    """``[(group name, its dataclass), ...]``: the training config's groups, then the queue settings."""
    groups = [(f.name, f.default_factory) for f in dataclasses.fields(TrainerConfig)]  # type: ignore[misc]
    return groups + [(QUEUE_GROUP, QueueConfig)]


def field_specs() -> dict[str, FieldSpec]:
    """Every field a layer may set (training config and queue settings) by dotted name, with type and default."""
    specs: dict[str, FieldSpec] = {}
    for group_name, group_cls in config_groups():
        hints = get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            dotted = f"{group_name}.{f.name}"
            specs[dotted] = FieldSpec(dotted, hints[f.name], f.default)
    return specs


_CHOICES = {"hyperparams.lr_scheduler": LR_SCHEDULERS, "hyperparams.precision": PRECISIONS,
            "optimizer.name": ("adamw",), "finetune.mode": FINETUNE_MODES, "hyperparams.attention": ATTENTION_PATHS,
            "hyperparams.loss_kernel": LOSS_KERNELS, "hyperparams.sharding": SHARDINGS}
_POSITIVE = {"hyperparams.epochs", "hyperparams.batch_size", "hyperparams.gradient_accumulation_steps",
             "hyperparams.max_length", "hyperparams.save_steps", "hyperparams.save_total_limit", "queue.max_attempts",
             "finetune.lora_rank", "finetune.lora_alpha"}
_NON_NEGATIVE = {"hyperparams.warmup_steps", "hyperparams.decay_steps", "hyperparams.max_steps",
                 "hyperparams.eval_steps", "hyperparams.eval_max_examples",
                 "hyperparams.eval_max_tokens", "hyperparams.learning_rate",
                 "hyperparams.max_grad_norm", "optimizer.weight_decay", "hyperparams.seed",
                 "hyperparams.global_batch_size"}
# Fields written as a comma-separated string that a YAML/JSON layer may also give as a list of strings.
_LIST_FIELDS = {"finetune.lora_target_modules"}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# Short forms a layer may use for a whole group's main field: ``finetune: lora`` means ``finetune.mode: lora``.
SHORTHANDS = {"finetune": "finetune.mode"}


def coerce(spec: FieldSpec, value: Any, from_text: bool) -> Any:
    """Return ``value`` as ``spec.type`` or raise ValueError saying what was expected.

    Args:
        from_text: the value came from a ``--set KEY=VALUE`` string, so "1e-5" or "true" are parsed.
    """
    t = spec.type
    if spec.dotted in _LIST_FIELDS:
        return _coerce_list(value)
    if from_text and isinstance(value, str):
        text = value.strip()
        if t is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if t is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
        if t is float:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
            return _finite(number, value)
        return text
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected a whole number, got {value!r}")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return _finite(float(value), value)
            except OverflowError:  # an int too big for a float
                raise ValueError(f"expected a finite number, got {value!r}") from None
        raise ValueError(f"expected a number, got {value!r}")
    if t is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    raise ValueError(f"unsupported type {t!r}")  # pragma: no cover - schema bug


def _finite(number: float, given: Any) -> float:
    """``number`` when it is finite; NaN and infinities (``nan``, ``inf``, ``1e999``) are never a setting."""
    if not math.isfinite(number):
        shown = repr(given) if len(repr(given)) <= 40 else repr(given)[:37] + "..."
        raise ValueError(f"expected a finite number, got {shown}; NaN and infinity train nothing")
    return number


def check_range(dotted: str, value: Any) -> str | None:
    """A problem text when ``value`` is outside what ``dotted`` allows, else None."""
    if dotted in _CHOICES and value not in _CHOICES[dotted]:
        return f"must be one of {', '.join(_CHOICES[dotted])}, got {value!r}"
    if dotted in _POSITIVE and value <= 0:
        hint = " (0 epochs train nothing; to bound a job, set max_steps)" if dotted == "hyperparams.epochs" else ""
        return f"must be positive, got {value!r}{hint}"
    if dotted in _NON_NEGATIVE and value < 0:
        return f"must not be negative, got {value!r}"
    if dotted == "hyperparams.eval_fraction" and not 0 <= value < 1:
        return f"must be in [0, 1), got {value!r}"
    if dotted == "finetune.lora_dropout" and not 0 <= value < 1:
        return f"must be in [0, 1), got {value!r}"
    if dotted == "finetune.lora_target_modules":
        names = value.split(",") if value else []
        bad = [n for n in names if not _MODULE_NAME.match(n)]
        if not names or bad:
            return (f"expected module names such as {QWEN3_LORA_TARGETS} (or all-linear), got {value!r}")
    return None


def check_config(config: TrainerConfig, sources: dict[str, str] | None = None) -> list[str]:
    """Problems that involve several fields (each field alone passed :func:`check_range`), one text each.

    Args:
        sources: the layer that set each dotted field, named in the messages when given.
    """
    def where(dotted: str) -> str:
        return f" ({sources[dotted]} layer)" if sources and dotted in sources else ""

    hp = config.hyperparams
    problems = []
    if hp.lr_scheduler in DECAYING_SCHEDULERS and 0 < hp.decay_steps <= hp.warmup_steps:
        problems.append(
            f"hyperparams.decay_steps={hp.decay_steps}{where('hyperparams.decay_steps')} must be greater than "
            f"hyperparams.warmup_steps={hp.warmup_steps}{where('hyperparams.warmup_steps')} with lr_scheduler "
            f"{hp.lr_scheduler}: the LR would fall to 0 as warmup ends. Set decay_steps to the campaign step where "
            "the LR should reach 0 (after warmup), or to 0 for no decay"
        )
    if hp.global_batch_size and hp.global_batch_size % hp.batch_size:
        problems.append(
            f"hyperparams.global_batch_size {hp.global_batch_size} is not a multiple of hyperparams.batch_size "
            f"{hp.batch_size}{where('hyperparams.global_batch_size')} (rows per optimizer step = batch_size x ranks "
            f"x accumulation): set global_batch_size to a multiple of {hp.batch_size}, or 0 to use batch_size x "
            "gradient_accumulation_steps"
        )
    if hp.sharding == "fsdp" and config.finetune.mode != "full":
        problems.append(
            f"hyperparams.sharding=fsdp{where('hyperparams.sharding')} shards full fine-tuning only; finetune.mode "
            f"{config.finetune.mode}{where('finetune.mode')} keeps a small adapter's optimizer state: set "
            "hyperparams.sharding=none"
        )
    return problems


def _coerce_list(value: Any) -> str:
    """``"q_proj, v_proj"`` or ``["q_proj", "v_proj"]`` -> ``"q_proj,v_proj"``."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ValueError(f"expected a list of names or a comma-separated string, got {value!r}")
    return ",".join(item.strip() for item in items if item.strip())
