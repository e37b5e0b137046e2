"""Size limits on one dataset file, with their defaults (``GUILD_MAX_*`` overrides them, see config.settings).

Defined here, below the engine, so that settings can build them without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_FILE_BYTES = 2 * 2**30
DEFAULT_MAX_LINE_BYTES = 2**20
DEFAULT_MAX_EXAMPLES = 1_000_000


@dataclass(frozen=True)
class DatasetLimits:
    """Size limits on one dataset file; None means no limit. Reading stops at the first one exceeded."""

    max_file_bytes: int | None = None
    max_line_bytes: int | None = None  # the "\n" not counted
    max_examples: int | None = None  # non-blank lines


DEFAULT_LIMITS = DatasetLimits(DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_EXAMPLES)
