"""The wall clock as Guild records it: ISO-8601 UTC strings with milliseconds."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """Now, as ``2026-11-28T09:05:07.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
