"""What every Guild CLI shares: a user error becomes ``error: ...`` lines on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from typing import Any

EXIT_USER_ERROR = 2


def report_error(exc: BaseException, stream=None) -> int:
    """Print ``exc`` one ``error:`` line per line of its text; return the exit code for a user error."""
    stream = stream or sys.stderr
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"error: {line}", file=stream)
    return EXIT_USER_ERROR


def print_record(record: dict[str, Any], width: int = 20) -> None:
    """``key: value`` lines, values as JSON, for ``show`` commands."""
    for key, value in record.items():
        print(f"{key + ':':{width}} {json.dumps(value)}")
