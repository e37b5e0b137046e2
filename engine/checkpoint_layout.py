"""A checkpoint's files on disk, without torch: names, finding complete ones, sizes, crash-safe deleting.

:mod:`engine.checkpoint` writes and loads checkpoints (and re-exports everything here); this module is what
code that only looks at or prunes checkpoints needs (campaign retention, ``campaigns show``, ``doctor``), so
those never import torch.

Deleting is crash-safe. A checkpoint is first renamed to a ``.trash-*`` name (one atomic rename; loaders only
look at ``step-N``), then removed. A checkpoint stripped to its final weights gets its ``WEIGHTS_ONLY`` marker
before its optimizer and RNG files go (renamed to ``.trash-*`` first too). Whatever a crash leaves is a whole
checkpoint, a weights-only one with trash beside it, or trash alone: :func:`remove_trash` clears trash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from config.files import fsync_path
from engine.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"
RNG_META = "rng.json"
WEIGHTS_ONLY_MARKER = "WEIGHTS_ONLY"
# What a checkpoint needs to be resumed from, beyond its weights (strip_to_weights removes these).
TRAINING_STATE_FILES = (OPTIMIZER_TENSORS, OPTIMIZER_META, RNG_TENSORS, RNG_META)

STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-step-"
TRASH_PREFIX = ".trash-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:05d}"


# ---------------------------------------------------------------------------------------------------- finding


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished checkpoint: a ``step-N`` directory holding the final marker."""
    return STEP_DIR.match(path.name) is not None and (path / MARKER_FILE).is_file()


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``checkpoint_dir`` as ``(step, path)``, oldest first."""
    found = []
    try:
        entries = list(Path(checkpoint_dir).iterdir())
    except OSError:
        return []
    for entry in entries:
        match = STEP_DIR.match(entry.name)
        if match and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint directory in ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a complete checkpoint.

    Raises:
        CheckpointError: ``path`` is not a complete checkpoint or its state cannot be read.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MARKER_FILE} marker in a step-N directory); "
            "resume from engine.checkpoint.latest_checkpoint() of its directory"
        )
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read the trainer state ({exc})") from None


def is_weights_only(path: Path) -> bool:
    """True when ``path`` is a complete checkpoint stripped to its final weights (not resumable)."""
    return is_complete(Path(path)) and (Path(path) / WEIGHTS_ONLY_MARKER).is_file()


# ------------------------------------------------------------------------------------------------------ sizes


def path_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file or a directory; 0 when it is gone). Links are not followed."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def training_state_bytes(path: Path) -> int:
    """Bytes of a checkpoint's optimizer and RNG files (what :func:`strip_to_weights` frees)."""
    return sum(path_bytes(Path(path) / name) for name in TRAINING_STATE_FILES if (Path(path) / name).exists())


# ---------------------------------------------------------------------------------------------------- pruning


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (only ever after a new one is complete)."""
    for _, path in list_checkpoints(checkpoint_dir)[: -max(1, keep)]:
        discard_checkpoint(path)
        logger.debug("removed old checkpoint %s", path)


def remove_stale_temp_dirs(checkpoint_dir: Path) -> None:
    """Remove ``.tmp-step-*`` directories left by a save that was killed (one job writes a directory at a time)."""
    try:
        entries = list(Path(checkpoint_dir).iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
            logger.warning("removing incomplete checkpoint %s left by an interrupted save", entry)
            shutil.rmtree(entry, ignore_errors=True)


def discard_checkpoint(path: Path) -> int:
    """Remove a checkpoint directory crash-safely (rename to trash, then delete); return the bytes freed."""
    path = Path(path)
    size = path_bytes(path)
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # removed meanwhile (by the job's own save_total_limit, or another prune)
        return 0
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
    return size


def strip_to_weights(path: Path) -> int:
    """Turn a complete checkpoint into its final weights: drop optimizer and RNG state; return the bytes freed.

    The model, tokenizer, ``trainer_state.json`` and ``COMPLETE`` stay, so it still loads with
    ``from_pretrained``; the ``WEIGHTS_ONLY`` marker says it cannot be resumed from. Idempotent: it also
    finishes a strip that a crash interrupted.

    Raises:
        CheckpointError: ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint; only a complete one is stripped to its weights")
    if not (path / WEIGHTS_ONLY_MARKER).is_file():
        # The marker first: from here on nobody takes this directory for a resumable checkpoint.
        tmp = path / f"{TRASH_PREFIX}{WEIGHTS_ONLY_MARKER}"
        write_json(tmp, {"removed": list(TRAINING_STATE_FILES), "stripped_at": time.time()})
        fsync_path(tmp)
        os.rename(tmp, path / WEIGHTS_ONLY_MARKER)
        fsync_path(path)
    for name in TRAINING_STATE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.replace(path / name, path / f"{TRASH_PREFIX}{name}")
    fsync_path(path)
    return remove_trash(path)


def remove_trash(directory: Path) -> int:
    """Delete the ``.trash-*`` entries in ``directory`` (left by a delete or a crash); return the bytes freed."""
    try:
        entries = [e for e in Path(directory).iterdir() if e.name.startswith(TRASH_PREFIX)]
    except OSError:
        return 0
    freed = 0
    for entry in entries:
        freed += path_bytes(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return freed


def trash_bytes(directory: Path) -> int:
    """Bytes held by ``.trash-*`` entries in ``directory`` (what :func:`remove_trash` would free)."""
    try:
        return sum(path_bytes(e) for e in Path(directory).iterdir() if e.name.startswith(TRASH_PREFIX))
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------------ internals


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


