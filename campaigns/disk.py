"""Disk space for checkpoints: how big the next ones will be, whether they fit, when to warn, how to say it.

A full checkpoint is the campaign's latest one when there is one; before that it is estimated from the model:
parameters (read from the safetensors headers, without torch) times fp32 weights plus AdamW's two fp32 moments,
plus the model directory's other files (config, tokenizer). What a campaign's checkpoints use now, and what a
prune would free, is :func:`jobs.retention.disk_usage`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

from campaigns.campaign import Campaign
from campaigns.errors import DiskSizeError, InsufficientDisk
from engine import checkpoint_layout as layout

# doctor warns when free space under $GUILD_HOME is below the larger of these two.
LOW_DISK_FRACTION = 0.10  # of the file system
LOW_DISK_CHECKPOINTS = 3  # times the largest campaign's full checkpoint
# A full checkpoint per parameter: fp32 weights plus AdamW's two fp32 moments.
CHECKPOINT_BYTES_PER_PARAM = 4 + 4 + 4


def file_system_usage(path: Path):
    """``shutil.disk_usage`` of ``path``, or of its nearest existing parent (a directory not made yet)."""
    return shutil.disk_usage(_existing(path))


def estimate_checkpoint_bytes(campaign: Campaign, model_path: str | Path | None) -> int:
    """The size of one full checkpoint of ``campaign``: its latest one's when there is one, else from the model.

    From the model: parameters (read from the safetensors headers, no torch) times fp32 weights plus AdamW's
    two fp32 moments, plus the model directory's other files (config, tokenizer).
    """
    latest = Path(campaign.latest_checkpoint) if campaign.latest_checkpoint else None
    if latest is not None and layout.is_complete(latest) and not layout.is_weights_only(latest):
        return layout.path_bytes(latest)
    if model_path is None:
        return 0
    model_dir = Path(model_path)
    weights = sorted(model_dir.glob("*.safetensors"))
    params = sum(_safetensors_params(p) for p in weights)
    others = sum(layout.path_bytes(p) for p in model_dir.iterdir() if p.is_file() and p.suffix != ".safetensors") \
        if model_dir.is_dir() else 0
    if params:
        return params * CHECKPOINT_BYTES_PER_PARAM + others
    return 3 * layout.path_bytes(model_dir)  # weights of an unknown layout: weights + two moments of the same size


def ensure_checkpoint_space(checkpoint_dir: Path, campaign: Campaign, model_path: str | Path | None,
                            save_total_limit: int) -> int:
    """Refuse to start a job whose checkpoints will not fit; return the bytes it needs.

    A job keeps ``save_total_limit`` checkpoints in ``checkpoint_dir`` and writes a new one before deleting the
    oldest, so at its peak it holds ``save_total_limit + 1`` (less those already there).

    Raises:
        InsufficientDisk: what is needed, what is free, where, and how to make room.
    """
    per_checkpoint = estimate_checkpoint_bytes(campaign, model_path)
    count = max(1, save_total_limit + 1 - len(layout.list_checkpoints(checkpoint_dir)))
    needed = per_checkpoint * count
    free = file_system_usage(checkpoint_dir).free
    if free < needed:
        job = Path(checkpoint_dir).name
        raise InsufficientDisk(
            f"not enough disk space for the checkpoints of job {job} under {checkpoint_dir}: it needs "
            f"{format_bytes(needed)} ({count} checkpoint(s) of {format_bytes(per_checkpoint)}: "
            f"hyperparams.save_total_limit={save_total_limit} kept plus the one being written), "
            f"{format_bytes(free)} is free. Fix: `python -m campaigns prune {campaign.id}` (--dry-run shows what it "
            f"frees), keep fewer (`python -m campaigns retention {campaign.id} --keep-weights 1`, or a lower "
            f"save_total_limit), or free space on that file system; then `python -m jobs retry {job}`")
    return needed


def low_disk_threshold(filesystem_bytes: int, largest_checkpoint_bytes: int, spec: str | None = None) -> int:
    """Free bytes below which ``doctor`` warns: ``spec`` (``15%``, ``50G``, ``800M``, bytes) when given, else the
    larger of 10% of the file system and three of the largest campaign checkpoint.

    Raises:
        DiskSizeError: ``spec`` is not a size.
    """
    if spec is None:
        return max(int(LOW_DISK_FRACTION * filesystem_bytes), LOW_DISK_CHECKPOINTS * largest_checkpoint_bytes)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([%KMGT]?)B?\s*", spec, re.IGNORECASE)
    if not match:
        raise DiskSizeError(f"--min-free {spec!r}: use a size such as 50G, 800M or 15%")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit == "%":
        return int(filesystem_bytes * number / 100)
    return int(number * 1000 ** " KMGT".index(unit or " "))


def format_bytes(n: int | float) -> str:
    """``1.9 GB``-style text (powers of 1000, like ``df -H``)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------------------------ internals


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for the free space of a directory not made yet)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _safetensors_params(path: Path) -> int:
    """Number of parameters in a safetensors file, from its JSON header (8-byte length, then the header)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return 0
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
