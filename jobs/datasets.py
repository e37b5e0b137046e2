"""The content-addressed dataset store: ``$GUILD_HOME/datasets/<sha[:2]>/<sha>.jsonl``.

A job trains on its stored copy, so editing or deleting the user's file after enqueue changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def stored_path(guild_home: Path, sha256: str) -> Path:
    return Path(guild_home) / "datasets" / sha256[:2] / f"{sha256}.jsonl"


def store_dataset(guild_home: Path, sha256: str, data: bytes) -> Path:
    """Write ``data`` under its hash (atomically; an existing copy is kept) and return the stored path."""
    target = stored_path(guild_home, sha256)
    if target.exists() and target.stat().st_size == len(data):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
