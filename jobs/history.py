"""The on-disk job history: one JSON line per transition, under ``$GUILD_HOME/logs/job-history.jsonl``.

It outlives Redis keys and Celery's result expiry, and is what an operator greps after the fact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class JobHistoryLog:
    """Append-only JSONL file of job transitions."""

    def __init__(self, guild_home: Path):
        self.path = Path(guild_home) / "logs" / "job-history.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        """Append one record. One ``write`` on an ``O_APPEND`` file, so concurrent writers never interleave."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:  # the Redis record is the source of truth; a full disk must not fail a job
            logger.warning("could not append to %s: %s", self.path, exc)

    def read(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if job_id is None or rec.get("job_id") == job_id:
                out.append(rec)
        return out
