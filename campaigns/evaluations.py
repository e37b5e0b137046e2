"""The campaign's evaluation log: ``$GUILD_HOME/campaigns/<hero>/<name>/evaluations.jsonl``.

One line per evaluation of the campaign's eval set, appended by the worker as it happens: the job, the global
step, the loss and its counts, the eval set's sha256 and every probe's generated answer. ``python -m campaigns
samples`` reads it to show how the answers changed over the campaign's steps. A line is written with one
``write`` on an ``O_APPEND`` file (one worker holds a campaign at a time), so a reader never sees half of one.

Size: a line holds at most ``MAX_PROBES`` answers of at most ``max_new_tokens`` tokens each (64 by default: a
few KiB a line; 16 x 1024 tokens at most, about 64 KiB). A job resumed after a crash evaluates its steps again:
:func:`read_log` keeps the last line of each (job, step, eval set).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from config.clock import utc_now
from engine.eval_plan import EvalPoint

logger = logging.getLogger(__name__)

LOG_FILE = "evaluations.jsonl"


@dataclass(frozen=True)
class LoggedEvaluation:
    """One line of the log."""

    job_id: str
    at: str
    point: EvalPoint


def log_path(campaign_dir: Path) -> Path:
    return Path(campaign_dir) / LOG_FILE


def append_evaluation(campaign_dir: Path, job_id: str, point: EvalPoint) -> None:
    """Append one evaluation (one ``write``)."""
    line = json.dumps({"job": job_id, "at": utc_now(), **point.to_dict()}, ensure_ascii=False) + "\n"
    fd = os.open(log_path(campaign_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_log(campaign_dir: Path) -> list[LoggedEvaluation]:
    """Every evaluation in the log, in step order; of repeats of a (job, step, eval set), the last written.

    A line that cannot be read (cut by a full disk) is skipped with a warning.
    """
    path = log_path(campaign_dir)
    if not path.exists():
        return []
    kept: dict[tuple[str, int, str], LoggedEvaluation] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                entry = LoggedEvaluation(str(data["job"]), str(data.get("at", "")), EvalPoint.from_dict(data))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("%s:%d: unreadable evaluation line skipped (%s)", path, number, exc)
                continue
            kept.pop((entry.job_id, entry.point.step, entry.point.eval_set), None)
            kept[(entry.job_id, entry.point.step, entry.point.eval_set)] = entry
    return sorted(kept.values(), key=lambda e: e.point.step)
