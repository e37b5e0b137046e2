"""The model a job trains: loading it (fp32 master weights, safetensors only), its optimizer, mixed precision,
activation checkpointing and compiled layers."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)


def compile_layers(model) -> None:
    """``torch.compile`` each decoder layer (static shapes): the document layout and the loss stay eager, so a new
    set of example lengths or loss-token count never recompiles anything."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        logger.warning("compile: no decoder layers found in %s; running eagerly", type(model).__name__)
    for layer in layers:
        layer.compile(dynamic=False)


def load_model(source: Path, **overrides):
    from transformers import AutoModelForCausalLM

    try:
        # fp32 master weights whatever the checkpoint's dtype: bf16 runs under autocast where it is supported.
        # use_safetensors: weights that exist only as a pickle (.bin) are refused, never unpickled.
        # overrides: engine.adapters.load_kwargs (a bf16 frozen base for LoRA, a 4-bit one for QLoRA).
        kwargs = {"dtype": torch.float32, "use_safetensors": True, **overrides}
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
        raise ModelLoadError(f"cannot load a causal LM from {source}: {type(exc).__name__}: {exc}") from None


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute) or not."""
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; older ones have only the former.
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def build_optimizer(model, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases).

    Fused (one kernel over all parameters) on CUDA and on the CPU, where it is ~4x faster than the default
    for-each implementation; other devices get the default.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay"}]
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=0.0, fused=True)
        except (RuntimeError, TypeError):  # an older torch or a dtype the fused kernel does not take
            pass
    return torch.optim.AdamW(groups, lr=0.0)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast for "bf16", and for "auto" on a GPU that supports it; fp32 (no autocast) otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
