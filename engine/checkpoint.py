"""Checkpoints: one directory per saved step, written atomically, never a pickle.

A checkpoint ``step-00042/`` holds:

* the model as a Hugging Face directory (``config.json``, ``model.safetensors``) plus the tokenizer, so it
  loads with ``from_pretrained`` on its own; for LoRA/QLoRA only the adapter (``adapter_model.safetensors``,
  ``adapter_config.json``: PEFT's format, see :mod:`engine.adapters`), the base being unchanged;
* ``optimizer.safetensors`` (every state tensor) and ``optimizer.json`` (param groups and scalars);
* ``rng.safetensors`` (torch CPU and CUDA generator states) and ``rng.json`` (Python's ``random``);
* ``trainer_state.json``: global step, run id, job step, data position, the resolved config and its hash, loss
  history; the learning rate needs no state of its own (see :mod:`engine.schedule`);
* ``COMPLETE``, written last.

It is written into ``.tmp-step-00042/`` beside, every file fsynced, then renamed. A crash mid-save leaves only
a ``.tmp-*`` directory, which loaders never look at and the next job removes; loaders also require ``COMPLETE``.

The files on disk, finding complete checkpoints, their sizes and crash-safe pruning live in
:mod:`engine.checkpoint_layout` (no torch, so CLIs can use them) and are re-exported here. Campaign retention
(:mod:`jobs.retention`) may strip an old checkpoint to its final weights: its optimizer and RNG files go and
a ``WEIGHTS_ONLY`` marker stays; it still loads as a model but is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from config.files import fsync_path as _fsync
from engine.adapters import is_adapted, save_adapter
from engine.checkpoint_layout import (  # noqa: F401 - re-exported: the files on disk, finding and pruning
    MARKER_FILE,
    OPTIMIZER_META,
    OPTIMIZER_TENSORS,
    RNG_META,
    RNG_TENSORS,
    STATE_FILE,
    TMP_PREFIX,
    TRAINING_STATE_FILES,
    WEIGHTS_ONLY_MARKER,
    checkpoint_name,
    discard_checkpoint,
    is_complete,
    is_weights_only,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint_state,
    remove_stale_temp_dirs,
    strip_to_weights,
)
from engine.checkpoint_layout import write_json as _write_json
from engine.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


# ----------------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    checkpoint_dir: Path, step: int, model, optimizer, tokenizer, state: dict[str, Any], save_total_limit: int,
    *, model_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune old ones; return its directory.

    If a complete checkpoint of ``step`` already exists it is kept and returned as is.

    ``model_state`` and ``optimizer_state`` replace ``model.state_dict()`` and ``optimizer.state_dict()`` when given
    (a sharded model's full state, gathered by :mod:`engine.data_parallel`); the files are the same either way.

    Raises:
        CheckpointError: a weight of ``model`` is NaN or infinite. Nothing is written, so the last good
            checkpoint stays the newest and a campaign never continues from broken weights.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / checkpoint_name(step)
    if is_complete(final):
        return final
    if model_state is None:
        check_finite_weights(model, step)
    else:
        _check_finite_tensors(model_state.items(), step)
    tmp = checkpoint_dir / f"{TMP_PREFIX}{step:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()

    if is_adapted(model):  # LoRA/QLoRA: the base never changes, the adapter is what this checkpoint holds
        save_adapter(model, tmp)
    elif model_state is not None:
        model.save_pretrained(tmp, state_dict=model_state)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors, meta = _optimizer_to_files(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
    _write_json(tmp / OPTIMIZER_META, meta)
    rng_tensors, rng_meta = capture_rng()
    save_file(rng_tensors, str(tmp / RNG_TENSORS))
    _write_json(tmp / RNG_META, rng_meta)
    _write_json(tmp / STATE_FILE, {"format": STATE_FORMAT, **state})
    for file in tmp.iterdir():
        if file.is_file():
            _fsync(file)
    # The marker goes last: a directory without it is never taken for a checkpoint.
    _write_json(tmp / MARKER_FILE, {"step": step, "saved_at": time.time()})
    _fsync(tmp / MARKER_FILE)
    _fsync(tmp)
    if final.exists():  # an incomplete leftover of an earlier crash at the same step
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(checkpoint_dir)
    logger.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - started)
    prune_checkpoints(checkpoint_dir, save_total_limit)
    return final


# ---------------------------------------------------------------------------------------------------- loading


def check_finite_weights(model, step: int) -> None:
    """Raise CheckpointError naming the parameters of ``model`` that hold a NaN or an infinity.

    One device-to-host transfer for the whole model (the flags are stacked on the device first).
    """
    _check_finite_tensors(model.named_parameters(), step)


def _check_finite_tensors(named_tensors, step: int) -> None:
    named = list(named_tensors)
    if not named:
        return
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(p).all().to(named[0][1].device) for _, p in named]).tolist()
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"refusing to save {checkpoint_name(step)}: non-finite weights (NaN or inf) in {shown}; the last good "
            "checkpoint stays the latest. Lower hyperparams.learning_rate (or max_grad_norm), or check the data"
        )


def _read_tensors_and_meta(path: Path, tensors_name: str, meta_name: str, what: str):
    """A checkpoint part stored as a safetensors file plus a JSON file (never a pickle)."""
    try:
        return load_file(str(path / tensors_name)), json.loads((path / meta_name).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from None


def load_optimizer_state(path: Path, optimizer, load: Callable[[Any, dict], None] | None = None) -> None:
    """Load ``optimizer``'s state from a checkpoint (the optimizer must be built over the same parameters).

    Args:
        load: ``load(optimizer, state_dict)`` instead of ``optimizer.load_state_dict`` (a sharded optimizer).
    """
    path = Path(path)
    tensors, meta = _read_tensors_and_meta(path, OPTIMIZER_TENSORS, OPTIMIZER_META, "the optimizer state")
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, scalars in meta["state"].items():
        state.setdefault(int(index), {}).update(scalars)
    # JSON has no tuples: give back the optimizer's own types (AdamW's betas are a tuple).
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
        for group in meta["param_groups"]
    ]
    try:
        if load is None:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        else:
            load(optimizer, {"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model ({exc})") from None


def restore_rng(path: Path) -> None:
    """Set the torch (CPU and CUDA) and Python random generators to the states saved in a checkpoint."""
    path = Path(path)
    tensors, meta = _read_tensors_and_meta(path, RNG_TENSORS, RNG_META, "the random generator states")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[f"torch_cuda.{i}"] for i in range(meta.get("num_cuda", 0))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The generator states as tensors (torch) and JSON (Python's ``random``). Numpy's is not used by the engine."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    num_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
            num_cuda += 1
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss], "num_cuda": num_cuda}


# ------------------------------------------------------------------------------------------------ internals


def _optimizer_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``state.<param>.<name>``) and JSON-able structure."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"state": scalars, "param_groups": state_dict["param_groups"]}
