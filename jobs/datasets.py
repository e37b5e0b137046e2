"""The content-addressed dataset store: ``$GUILD_HOME/datasets/<sha[:2]>/<sha>.jsonl``.

A job trains on its stored copy, so editing or deleting the user's file after enqueue changes nothing. Copies are
streamed (constant memory), hashed on the way and checked against the hash the validation computed, written to a
temp file beside the target, fsynced and renamed: a copy is either whole and right, or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from config.errors import GuildError
from config.files import fsync_path

COPY_CHUNK_BYTES = 1 << 20


class DatasetChanged(GuildError):
    """Raised when a dataset file's content changed between its validation and its copy into the store."""


def stored_path(guild_home: Path, sha256: str) -> Path:
    return Path(guild_home) / "datasets" / sha256[:2] / f"{sha256}.jsonl"


def store_dataset(guild_home: Path, sha256: str, data: bytes | str | os.PathLike) -> Path:
    """Store a dataset under its hash (atomically; an existing copy is kept) and return the stored path.

    Args:
        sha256: the hex sha256 the content must have (from :func:`engine.formats.validate_file`).
        data: the file to copy (streamed), or its bytes.

    Raises:
        DatasetChanged: the file's content no longer has ``sha256`` (it was edited after validation); nothing
            is stored.
        OSError: the copy failed (disk full...); nothing is left behind.
    """
    target = stored_path(guild_home, sha256)
    size = len(data) if isinstance(data, bytes) else os.stat(data).st_size
    if target.exists() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes):
                digest.update(data)
                out.write(data)
            else:
                with open(data, "rb") as source:
                    while chunk := source.read(COPY_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise DatasetChanged(f"{os.fspath(data) if not isinstance(data, bytes) else 'the data'}: its content "
                                 "changed while it was being enqueued; enqueue it again once nothing writes to it")
        os.replace(tmp, target)
        fsync_path(target.parent)  # the rename is durable
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
