"""GPU memory a training job needs, estimated from the model's shape and the job's config before anything loads.

The estimate is per GPU (per rank) and sums, in bytes:

* **weights** — full tuning: fp32 master weights (4 B/param) plus, under bf16 autocast, the bf16 copies autocast
  keeps for the forward and backward (2 B/param). LoRA: the frozen base in bf16 (fp32 when not computing in bf16)
  plus the fp32 adapter. QLoRA: the projections in 4-bit NF4 with double-quantised scales (~4.13 bits/param), the
  rest (embeddings, norms) in fp32 as peft's k-bit preparation leaves them, plus the fp32 adapter;
* **gradients** — fp32, of what trains (all weights, or the adapter); under DDP its buckets add one more copy;
* **optimizer** — AdamW's two fp32 moments of what trains (8 B/param);
* **activations** — what the backward pass needs, per token of a micro-batch (``batch_size x max_length``: packed
  rows are full): every layer's saved tensors without activation checkpointing; with it, each layer's input
  plus one layer recomputed;
* **logits** — the output projection and cross-entropy at the loss positions (every token assumed to carry loss,
  the worst case: text data). The engine's chunked loss (``engine.loss``) holds one chunk's logits at a time
  (:data:`LOGIT_CHUNK_ELEMENTS` elements: 1,766 tokens of Qwen3's vocabulary), in bf16 and fp32 with their gradient
  (:data:`LOGIT_BYTES_PER_ELEMENT`), plus the gradients it accumulates over the chunks: one of the hidden states at
  the loss positions and, when the output layer trains, one of its weight (fp32);
* **overhead** — CUDA context, cuBLAS workspaces and allocator fragmentation: a fixed part plus a margin.

Sharded training (FSDP, ``hyperparams.sharding=fsdp`` on a multi-GPU worker) divides weights, gradients and
optimizer by the number of ranks and adds the gathered parameters of one layer. The figures are an estimate,
meant to refuse a job that cannot fit before it loads anything (:func:`check_fits`) and to compare modes in
``python -m heroes list``; a real run's peak is in ``bench/RESULTS.md`` where a GPU was available.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.errors import GuildError
from config.schema import TrainerConfig

GIB = 1024**3
# Bytes per (loss token x vocabulary entry) of a chunk: bf16 logits, their fp32 copy, fp32 log-softmax and its
# gradient.
LOGIT_BYTES_PER_ELEMENT = 12
# Logits of one chunk of the engine's loss on a GPU: engine.loss.CHUNK_ELEMENTS["cuda"] (a test keeps them equal;
# importing the engine here would import torch into `heroes list`). At least 64 tokens a chunk.
LOGIT_CHUNK_ELEMENTS = 2**28
LOGIT_CHUNK_MIN_TOKENS = 64
OVERHEAD_FIXED_BYTES = int(1.5 * GIB)
OVERHEAD_MARGIN = 0.10
# NF4 with double quantisation: 4 bits + an 8-bit scale per 64 weights + an fp32 scale per 256 of those.
QLORA_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
# Suggest "more GPUs (sharded)" in refusals: the engine shards a full fine-tuning job over ranks (FSDP2).
SHARDING_AVAILABLE = True
MODES = ("full", "lora", "qlora")
_SHAPE_KEYS = {"hidden_size": int, "num_layers": int, "num_heads": int, "num_kv_heads": int, "head_dim": int,
               "intermediate_size": int, "tied_embeddings": bool}


class WontFit(GuildError):
    """Raised when a job's estimated memory exceeds the GPU of the worker that would run it."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama/Qwen3-style decoder that memory depends on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qk_norm: bool = True  # Qwen3 normalises each head's q and k (2 x head_dim weights per layer)

    # ---- parameter counts ----------------------------------------------------------------------------------
    def projections(self) -> dict[str, tuple[int, int]]:
        """``{module: (in_features, out_features)}`` of one decoder layer's linear projections."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_parameters(self) -> int:
        """The decoder layers' projections: what QLoRA stores in 4 bits."""
        return self.num_layers * sum(a * b for a, b in self.projections().values())

    def parameters(self) -> int:
        """All parameters, counting tied input/output embeddings once (as ``model.parameters()`` does)."""
        norms = self.num_layers * (2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)) \
            + self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.linear_parameters() + norms + embeddings

    def lora_parameters(self, rank: int, targets: str) -> int:
        """Adapter parameters for ``rank`` on ``targets`` (comma-separated names or ``all-linear``)."""
        projections = self.projections()
        names = list(projections) if targets == "all-linear" else targets.split(",")
        return self.num_layers * sum(rank * sum(projections[n]) for n in names if n in projections)

    # ---- sources -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a Hugging Face ``config.json`` (Qwen3/Llama key names)."""
        heads = config["num_attention_heads"]
        return cls(hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                   qk_norm=config.get("model_type") == "qwen3")


def parse_shape(data: Any, vocab_size: int, source: str, problems: list[str]) -> ModelShape | None:
    """A hero profile's ``model.shape`` mapping; appends one problem per bad key and returns None if any."""
    if not isinstance(data, dict):
        problems.append(f"{source}: key 'model.shape': not a mapping of {', '.join(_SHAPE_KEYS)}")
        return None
    before = len(problems)
    for key, typ in _SHAPE_KEYS.items():
        value = data.get(key)
        ok = isinstance(value, typ) and (typ is bool or (not isinstance(value, bool) and value > 0))
        if not ok:
            what = "true or false" if typ is bool else "a positive whole number"
            problems.append(f"{source}: key 'model.shape.{key}': missing or not {what}")
    for key in data:
        if key not in _SHAPE_KEYS:
            problems.append(f"{source}: key 'model.shape.{key}': unknown key; allowed: {', '.join(_SHAPE_KEYS)}")
    if len(problems) > before:
        return None
    return ModelShape(vocab_size=vocab_size, **{k: data[k] for k in _SHAPE_KEYS})


def shape_of(hero: Any, model_path: str | Path | None = None) -> ModelShape | None:
    """The hero's ``model.shape``, else the one its model directory's ``config.json`` describes, else None."""
    if getattr(hero, "shape", None) is not None:
        return hero.shape
    if model_path is not None:
        try:
            return ModelShape.from_hf_config(json.loads((Path(model_path) / "config.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


# ------------------------------------------------------------------------------------------------ estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by part."""

    mode: str
    ranks: int
    strategy: str  # "single" | "ddp" | "fsdp"
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        """``"21.3 GiB (weights 3.3, gradients 2.2, optimizer 4.4, activations 9.1, logits 1.2, overhead 1.1)"``."""
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}" for name in
                          ("weights", "gradients", "optimizer", "activations", "logits", "overhead"))
        return f"{self.total / GIB:.1f} GiB ({parts})"


def estimate_memory(shape: ModelShape, config: TrainerConfig, ranks: int = 1, strategy: str | None = None,
                    bf16: bool | None = None) -> MemoryEstimate:
    """The memory one GPU needs to train ``shape`` with ``config`` as one of ``ranks`` ranks.

    Args:
        strategy: "single" (one rank), "ddp" (replicated) or "fsdp" (sharded); None: "single" on one rank, else
            what ``hyperparams.sharding`` says (``none``: "ddp").
        bf16: whether the GPU computes in bf16; None reads ``hyperparams.precision`` ("fp32" means no).
    """
    hp = config.hyperparams
    strategy = strategy or ("single" if ranks == 1 else "fsdp" if hp.sharding == "fsdp" else "ddp")
    if strategy not in ("single", "ddp", "fsdp"):
        raise ValueError(f"unknown strategy {strategy!r}")
    hp, ft = config.hyperparams, config.finetune
    bf16 = hp.precision != "fp32" if bf16 is None else bf16
    act_bytes = 2 if bf16 else 4
    total_params = shape.parameters()
    adapter = 0 if ft.mode == "full" else shape.lora_parameters(ft.lora_rank, ft.lora_target_modules)

    if ft.mode == "full":
        trainable = total_params
        weights = 4 * total_params + (2 * total_params if bf16 else 0)
    elif ft.mode == "lora":
        trainable = adapter
        weights = (2 if bf16 else 4) * total_params + 4 * adapter
    else:
        trainable = adapter
        linear = shape.linear_parameters()
        weights = int(linear * QLORA_BITS_PER_PARAM / 8) + 4 * (total_params - linear) + 4 * adapter
    gradients = 4 * trainable
    optimizer = 8 * trainable
    if strategy == "ddp":
        gradients *= 2  # DDP's reducer buckets hold a second copy of the gradients
    elif strategy == "fsdp":
        layer = sum(a * b for a, b in shape.projections().values())
        gathered = 2 * layer * (2 if bf16 else 4)  # one layer's full parameters gathered, and the next prefetched
        weights, gradients, optimizer = weights // ranks + gathered, gradients // ranks, optimizer // ranks

    tokens = hp.batch_size * hp.max_length
    per_token_layer = _saved_elements_per_token_layer(shape, ft) * act_bytes
    if hp.gradient_checkpointing:
        activations = tokens * (shape.num_layers * shape.hidden_size * act_bytes + per_token_layer)
    else:
        activations = tokens * shape.num_layers * per_token_layer
    chunk = max(LOGIT_CHUNK_MIN_TOKENS, LOGIT_CHUNK_ELEMENTS // shape.vocab_size)
    logits = min(tokens, chunk) * shape.vocab_size * LOGIT_BYTES_PER_ELEMENT + tokens * shape.hidden_size * 4
    if ft.mode == "full":  # the output layer trains: its weight's gradient is accumulated over the chunks
        logits += shape.vocab_size * shape.hidden_size * 4
    subtotal = weights + gradients + optimizer + activations + logits
    overhead = OVERHEAD_FIXED_BYTES + int(OVERHEAD_MARGIN * subtotal)
    return MemoryEstimate(ft.mode, ranks, strategy, weights, gradients, optimizer, activations, logits, overhead)


def _saved_elements_per_token_layer(shape: ModelShape, finetune: Any) -> int:
    """Tensor elements (in bf16 equivalents) one decoder layer keeps per token for its backward pass.

    Each RMSNorm keeps its fp32 input, its fp32 normalised value and its output: 5 x its width (two over the hidden
    state, q_norm over q, k_norm over k). Attention (SDPA/flash) keeps q, k, v after the rotary embedding and its
    output; the SwiGLU MLP keeps gate, up, SiLU(gate) and their product (4 x intermediate). Total
    10 h + 7 q + 7 kv + 4 i. LoRA with dropout also keeps each adapted module's dropped input.
    """
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    norms_qk = (5 * q + 5 * kv) if shape.qk_norm else 0
    elements = 10 * shape.hidden_size + norms_qk + 2 * q + 2 * kv + 4 * shape.intermediate_size
    if finetune.mode != "full" and finetune.lora_dropout > 0:
        projections = shape.projections()
        names = list(projections) if finetune.lora_target_modules == "all-linear" else \
            finetune.lora_target_modules.split(",")
        elements += sum(projections[n][0] for n in names if n in projections)
    return elements


# ---------------------------------------------------------------------------------------------------- check


def check_fits(shape: ModelShape, config: TrainerConfig, gpu_bytes: int | None, ranks: int = 1,
               strategy: str | None = None) -> MemoryEstimate:
    """Refuse a job that will not fit the worker's GPUs, before anything loads.

    Args:
        gpu_bytes: memory of one of the worker's GPUs; None (a CPU worker) skips the check.
        ranks: GPUs the job runs on.

    Returns:
        The estimate (the caller may log it).

    Raises:
        WontFit: with the estimate and the changes that would fit (a smaller batch, activation checkpointing,
            LoRA/QLoRA, more GPUs), each with its own estimate.
    """
    estimate = estimate_memory(shape, config, ranks, strategy)
    if gpu_bytes is None or estimate.total <= gpu_bytes:
        return estimate
    fixes = _fixes(shape, config, gpu_bytes, ranks, strategy)
    raise WontFit(
        f"this job needs ~{estimate.describe()} per GPU in finetune.mode {config.finetune.mode}, more than the "
        f"{gpu_bytes / GIB:.1f} GiB of this worker's GPU; "
        + (f"fix: {'; or '.join(fixes)}" if fixes else "no single change fits: use a GPU with more memory")
    )


def _fixes(shape: ModelShape, config: TrainerConfig, gpu_bytes: int, ranks: int, strategy: str | None) -> list[str]:
    hp, ft = config.hyperparams, config.finetune

    def fits(cfg: TrainerConfig, n: int = ranks, how: str | None = strategy) -> MemoryEstimate | None:
        est = estimate_memory(shape, cfg, n, how)
        return est if est.total <= gpu_bytes else None

    def with_hp(cfg: TrainerConfig, **changes) -> TrainerConfig:
        return dataclasses.replace(cfg, hyperparams=dataclasses.replace(cfg.hyperparams, **changes))

    fixes = []
    # A smaller micro-batch that keeps the global batch (config.batching): more accumulation, the same training.
    total = hp.global_batch_size or hp.batch_size * hp.gradient_accumulation_steps
    for batch in range(hp.batch_size - 1, 0, -1):
        if total % (batch * ranks):
            continue
        est = fits(with_hp(config, batch_size=batch))
        if est:
            change = f"batch_size={batch}" if hp.global_batch_size else \
                f"batch_size={batch} gradient_accumulation_steps={total // batch}"
            fixes.append(f"{change} (~{est.total / GIB:.1f} GiB, the same rows per step)")
            break
    if not hp.gradient_checkpointing:
        est = fits(with_hp(config, gradient_checkpointing=True))
        if est:
            fixes.append(f"gradient_checkpointing=true (~{est.total / GIB:.1f} GiB, ~30% slower)")
    for mode in MODES[MODES.index(ft.mode) + 1:]:
        est = fits(dataclasses.replace(config, finetune=dataclasses.replace(ft, mode=mode)))
        if est:
            fixes.append(f"finetune={mode} in a new campaign (~{est.total / GIB:.1f} GiB)")
            break
    if not fixes:  # no single change: the smallest micro-batch with checkpointing, then shorter rows
        accumulate = "" if hp.global_batch_size else f" gradient_accumulation_steps={total}"
        for length in (hp.max_length, hp.max_length // 2, hp.max_length // 4):
            if length < 128:
                break
            est = fits(with_hp(config, batch_size=1, gradient_checkpointing=True, max_length=length))
            if est:
                shorter = f" max_length={length}" if length != hp.max_length else ""
                fixes.append(f"batch_size=1{accumulate} gradient_checkpointing=true{shorter} "
                             f"(~{est.total / GIB:.1f} GiB)")
                break
    if SHARDING_AVAILABLE and ft.mode == "full":
        for n in (2, 4, 8):
            if n > ranks:
                est = fits(config, n, "fsdp")
                if est:
                    fixes.append(f"hyperparams.sharding=fsdp on a worker with {n} GPUs (make worker "
                                 f"GPUS=0,...,{n - 1}; ~{est.total / GIB:.1f} GiB each)")
                    break
    return fixes


def gpu_memory_bytes(device_index: int = 0) -> int | None:
    """Total memory of this process's CUDA device ``device_index``, or None without CUDA (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device_index).total_memory


def mode_estimates(shape: ModelShape, config: TrainerConfig) -> dict[str, MemoryEstimate]:
    """One GPU's estimate for each finetune mode, ``config`` otherwise unchanged (for ``heroes list``)."""
    return {mode: estimate_memory(shape, dataclasses.replace(config, finetune=dataclasses.replace(
        config.finetune, mode=mode))) for mode in MODES}


def hero_estimates(hero: Any) -> tuple[str, dict[str, MemoryEstimate]]:
    """The hero's default finetune mode, and one GPU's estimate per mode at its own defaults (its
    ``training_defaults``); no estimates when the hero has no ``model.shape``.

    Raises:
        ConfigError: the hero's ``training_defaults`` do not resolve.
    """
    from config.layers import Layer, resolve

    config = resolve([Layer("hero", hero.training_defaults, hero.source)]).config
    if getattr(hero, "shape", None) is None:
        return config.finetune.mode, {}
    return config.finetune.mode, mode_estimates(hero.shape, config)
