"""Fine-tuning modes: which weights of a loaded model train, and how adapter weights are saved and loaded.

``finetune.mode`` (:class:`config.schema.FinetuneConfig`):

* ``full``: every weight trains (fp32 master weights; bf16 autocast on a GPU). Nothing here changes the model.
* ``lora``: LoRA adapters (peft) on ``lora_target_modules``; the base is frozen. On a bf16 GPU the frozen base is
  loaded in bf16 (half the memory; it never receives an update), the adapter stays fp32. On the CPU all is fp32.
* ``qlora``: the same adapters over a base loaded in 4-bit NF4 (double quantisation, bf16 compute) through
  bitsandbytes. CUDA only: refused with :class:`engine.errors.FinetuneUnsupported` anywhere else, before loading.

The trained model stays an ordinary transformers model with LoRA layers injected in place (peft's
``inject_adapter_in_model``), not a ``PeftModel`` wrapper, so the training loop, the loss and evaluation treat
every mode alike. What differs is here, as the hooks the engine calls:

* :func:`weights_source` / :func:`load_kwargs` — where the weights load from (adapters: always the base model;
  the checkpoint holds only the adapter) and the ``from_pretrained`` arguments (dtype, 4-bit quantisation);
* :func:`prepare_model` — inject the adapter (seeded: the same config gives the same initial adapter), load it
  from a checkpoint, move the model to its device;
* :func:`save_adapter` / :func:`load_adapter` — the adapter as ``adapter_model.safetensors`` + ``adapter_config.json``,
  in PEFT's own format (so ``PeftModel.from_pretrained(base, checkpoint)`` loads a checkpoint as is), loaded back
  bit for bit;
* :func:`trainable_state_dict`, :func:`parameter_counts`, :func:`is_adapted`;
* :func:`merge_adapter` — base + adapter merged into one plain model, for export.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import CheckpointError, FinetuneUnsupported, ModelLoadError

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"
# PEFT stores a PeftModel's state: every key starts with the wrapper's path to the base model.
PEFT_PREFIX = "base_model.model."
ADAPTER_MODES = ("lora", "qlora")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model: how many train, how many there are (a 4-bit weight counts as stored)."""

    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


# ------------------------------------------------------------------------------------------------- checks


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def finetune_refusal(mode: str, device_type: str, bitsandbytes: bool | None = None) -> str | None:
    """Why ``mode`` cannot train on a ``device_type`` worker, or None when it can.

    Args:
        bitsandbytes: whether bitsandbytes is installed; None looks it up in this process.
    """
    if mode != "qlora":
        return None
    if device_type != "cuda":
        return (f"finetune.mode qlora needs a CUDA GPU (its 4-bit base runs on bitsandbytes' CUDA kernels) and this "
                f"worker trains on {device_type}: run the campaign on a GPU worker, or use finetune.mode lora")
    if not (has_bitsandbytes() if bitsandbytes is None else bitsandbytes):
        return ("finetune.mode qlora needs the bitsandbytes package, which this worker does not have: "
                "pip install 'guild[qlora]' on it, or use finetune.mode lora")
    return None


def check_supported(mode: str, device: torch.device) -> None:
    """Raise FinetuneUnsupported when ``mode`` cannot train on ``device`` (see :func:`finetune_refusal`)."""
    refusal = finetune_refusal(mode, torch.device(device).type)
    if refusal:
        raise FinetuneUnsupported(refusal)


# ---------------------------------------------------------------------------------------------- loading


def weights_source(model_path: str | Path, resume_from: str | Path | None, finetune: Any) -> Path:
    """Where ``from_pretrained`` loads weights from: a full checkpoint is a whole model; an adapter checkpoint
    holds only the adapter, so its base is always ``model_path``."""
    if finetune.mode == "full" and resume_from is not None:
        return Path(resume_from)
    return Path(model_path)


def load_kwargs(config: Any, device: torch.device) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``config.finetune.mode`` on ``device`` (empty for full tuning).

    Raises:
        FinetuneUnsupported: QLoRA without CUDA or bitsandbytes (checked before anything loads).
    """
    mode = config.finetune.mode
    device = torch.device(device)
    check_supported(mode, device)
    if mode == "lora" and _bf16_compute(device, config.hyperparams.precision):
        return {"dtype": torch.bfloat16}  # the frozen base: half the memory, and autocast would cast it anyway
    if mode == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"quantization_config": quantization, "dtype": torch.bfloat16, "device_map": {"": index}}
    return {}


def prepare_model(model, config: Any, device: torch.device, resume_from: str | Path | None = None):
    """Make a freshly loaded model ready to train in ``config.finetune.mode`` on ``device``.

    Full: moved to ``device``. LoRA/QLoRA: adapters injected on the target modules with an initialisation seeded
    by ``hyperparams.seed`` (the global random state is left as it was), every other weight frozen, the adapter in
    fp32; then, when resuming, the adapter of ``resume_from`` loaded exactly.

    Returns:
        The model (the same object, changed in place).

    Raises:
        FinetuneUnsupported: the mode cannot run here, or no target module exists in this model.
        CheckpointError: ``resume_from`` holds no adapter, or one of another rank or other modules.
    """
    finetune = config.finetune
    device = torch.device(device)
    if finetune.mode == "full":
        return model.to(device)
    check_supported(finetune.mode, device)
    from peft import inject_adapter_in_model

    if finetune.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings to fp32 for stable training over a 4-bit base (they are few parameters).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = lora_config(finetune)
    lora.base_model_name_or_path = getattr(model, "name_or_path", None)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.hyperparams.seed)
        try:
            inject_adapter_in_model(lora, model, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise FinetuneUnsupported(
                f"finetune.lora_target_modules {finetune.lora_target_modules!r} does not fit this model ({exc}); "
                f"its linear layers are: {', '.join(linear)}") from None
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # the adapter trains in fp32 whatever its base's dtype
    if finetune.mode == "lora":
        model = model.to(device)
    if resume_from is not None:
        load_adapter(model, resume_from)
    counts = parameter_counts(model)
    logger.info("%s: %d of %d parameters train (%.2f%%), rank %d on %s", finetune.mode, counts.trainable,
                counts.total, 100 * counts.trainable_fraction, finetune.lora_rank, finetune.lora_target_modules)
    return model


def lora_config(finetune: Any):
    """The peft ``LoraConfig`` of a :class:`config.schema.FinetuneConfig`."""
    from peft import LoraConfig

    targets = finetune.lora_target_modules
    return LoraConfig(r=finetune.lora_rank, lora_alpha=finetune.lora_alpha, lora_dropout=finetune.lora_dropout,
                      target_modules=targets if targets == "all-linear" else targets.split(","), bias="none",
                      task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------- inspection


def is_adapted(model) -> bool:
    """True when ``model`` carries injected adapters (its checkpoints then hold only the adapter)."""
    return bool(getattr(model, "peft_config", None))


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights that train, by parameter name (detached; the live tensors, not copies)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model) -> ParameterCounts:
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCounts(trainable, total)


# ---------------------------------------------------------------------------------------- saving / loading


def save_adapter(model, directory: str | Path) -> None:
    """Write ``model``'s adapter into ``directory`` as ``adapter_model.safetensors`` + ``adapter_config.json``.

    The format is PEFT's: ``PeftModel.from_pretrained(base, directory)`` loads it without Guild.
    """
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    tensors = {PEFT_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))


def load_adapter(model, directory: str | Path) -> None:
    """Load the adapter saved by :func:`save_adapter` into ``model`` (which carries the same adapter), exactly.

    Raises:
        CheckpointError: no adapter there, or it does not match the model's adapter (rank, target modules).
    """
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory} holds no adapter ({ADAPTER_WEIGHTS}): it is a full fine-tuning "
                              "checkpoint; a LoRA job cannot resume from it (start a new campaign)")
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the adapter ({exc})") from None
    state = {name.removeprefix(PEFT_PREFIX): t for name, t in tensors.items()}
    expected = set(get_adapter_names(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the adapter does not match this model's (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); were finetune.lora_target_modules changed?")
    try:
        set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:  # a shape mismatch: another rank
        raise CheckpointError(f"{path}: the adapter does not fit this model ({str(exc).splitlines()[0]}); "
                              "was finetune.lora_rank changed?") from None


def get_adapter_names(model) -> list[str]:
    """The keys of the adapter's state as :func:`save_adapter` writes them (without the PEFT prefix)."""
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter checkpoint or export."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the adapter config ({exc})") from None


def merge_adapter(base_path: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The base model of ``base_path`` with the adapter of ``adapter_dir`` merged into its weights.

    The result is a plain transformers model (no LoRA layers left). A QLoRA adapter merges into the full-precision
    base (the standard way to publish one); its outputs differ from the 4-bit training model's by the quantisation.

    Raises:
        ModelLoadError: the base cannot be loaded; CheckpointError: the adapter cannot.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
        raise ModelLoadError(f"cannot load the base model {base_path}: {type(exc).__name__}: {exc}") from None
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot apply the adapter of {adapter_dir} to {base_path}: "
                              f"{type(exc).__name__}: {exc}") from None
    return model.merge_and_unload()


def _bf16_compute(device: torch.device, precision: str) -> bool:
    """Whether the engine's autocast runs this device in bf16 (the same rule as engine.model's ``autocast_for``)."""
    if precision == "bf16":
        return device.type == "cuda"  # a bf16 base on the CPU would be slow and inexact: keep fp32 there
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
