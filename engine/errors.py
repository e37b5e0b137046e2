"""Errors the training engine raises. Each says what is wrong and how to fix it."""

from __future__ import annotations

from config.errors import GuildError


class EngineError(GuildError):
    """Base class of the engine's errors."""


class DatasetInvalid(EngineError):
    """Raised when a dataset cannot be trained on: it has no example left after tokenisation and truncation,
    or the chat template cannot render it. The caller marks the job skipped, not failed."""


class ModelLoadError(EngineError):
    """Raised when the model or its tokenizer cannot be loaded from the given path or checkpoint."""


class ChatTemplateError(ModelLoadError):
    """Raised when the hero's chat template is broken: it does not compile, or it fails or leaves the messages out
    for a plain user/assistant conversation. The fault is the model's, not the data's: the job fails (it is not
    skipped), and the message names the file the template lives in."""


class CheckpointError(EngineError):
    """Raised when a checkpoint directory is incomplete, unreadable or belongs to another model."""


class FinetuneUnsupported(EngineError):
    """Raised when a finetune mode cannot train on this worker (QLoRA without CUDA or bitsandbytes), or its adapter
    settings do not fit the model. Raised before any weight is loaded where that can be known."""


class AttentionConfigError(EngineError):
    """Raised when the configured attention cannot keep packed examples apart on this device or model (which would
    let examples attend to each other), or cannot train there at all. The message names the key and the fix."""


class EvalSetInvalid(EngineError):
    """Raised when a campaign's eval set cannot be evaluated by this hero: no example keeps a loss token within its
    max_length, or the chat template rejects a line (named by file and line). The job fails: the fault is the eval
    set's, not the job's data."""


class EvalSetTooLarge(EngineError):
    """Raised when an eval set has more tokens than the job's ``hyperparams.eval_max_tokens`` allows; the message
    gives both numbers and the fix."""
