"""Measured training speeds: what ETAs divide by, per hero and kind of device.

Every completed job leaves a :class:`SpeedSample` in the job store, written in the same transaction as its
completion (``JobStore.transition``): the tokens per second of its training loop, and the rest of its wall time
(loading the model, tokenising, the final evaluation and save) as a fixed cost per job. ``jobs plan`` takes the
median of the newest samples of a hero on a kind of device (:func:`measured_speed`), so one odd job (a cold start,
a busy machine) does not swing every ETA.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

SAMPLES_KEPT = 20  # per hero and device kind, newest first

_GPU_RANGE = re.compile(r"^gpu(\d+)-(\d+)$")


def device_kind(worker_name: str | None) -> str:
    """What a worker trains on, from its name (``scripts/services.sh`` names them): ``cpu0@h`` → ``cpu``,
    ``gpu3@h`` → ``gpu``, ``gpu0-3@h`` → ``gpu x4``, ``gpu0+2@h`` → ``gpu x2``; anything else → ``unknown``."""
    label = (worker_name or "").split("@", 1)[0]
    if label.startswith("cpu"):
        return "cpu"
    if not label.startswith("gpu"):
        return "unknown"
    count = 0
    for run in label[3:].split("+"):
        found = _GPU_RANGE.match("gpu" + run)
        count += int(found.group(2)) - int(found.group(1)) + 1 if found else 1
    return "gpu" if count <= 1 else f"gpu x{count}"


@dataclass(frozen=True)
class SpeedSample:
    """One completed run: its loop speed and its fixed cost."""

    tokens_per_sec: float
    overhead_s: float  # wall time beyond the training loop: model load, tokenising, final evaluation and save
    tokens: int
    job_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_of(job_id: str, started_at: str | None, finished_at: str | None, trained_tokens: int | None,
              tokens_per_sec: float | None) -> SpeedSample | None:
    """The sample of a completed run, or None when it trained nothing measurable."""
    if not trained_tokens or not tokens_per_sec or tokens_per_sec <= 0 or not started_at or not finished_at:
        return None
    try:
        wall_s = (datetime.fromisoformat(finished_at) - datetime.fromisoformat(started_at)).total_seconds()
    except ValueError:
        return None
    overhead = max(0.0, wall_s - trained_tokens / tokens_per_sec)
    return SpeedSample(round(float(tokens_per_sec), 2), round(overhead, 2), int(trained_tokens), job_id)


@dataclass(frozen=True)
class Speed:
    """How fast a hero trains on a kind of device, and where the figure comes from.

    Attributes:
        tokens_per_sec: None when unknown.
        overhead_s: the fixed cost per job (0 when not measured).
        source: ``measured`` (median of the newest completed jobs), ``hero profile`` (a figure written in the
            hero's YAML, not measured here) or ``unknown``.
        samples: how many jobs the median is over.
    """

    tokens_per_sec: float | None
    overhead_s: float = 0.0
    source: str = "unknown"
    samples: int = 0

    def duration_s(self, tokens: int) -> float | None:
        """How long a job training ``tokens`` takes, or None when the speed is unknown."""
        if not self.tokens_per_sec:
            return None
        return self.overhead_s + tokens / self.tokens_per_sec

    def describe(self) -> str:
        if self.tokens_per_sec is None:
            return "unknown (no job measured yet)"
        if self.source == "measured":
            return (f"{self.tokens_per_sec:,.0f} tok/s + {self.overhead_s:.1f} s per job "
                    f"(median of {self.samples} job{'s' if self.samples != 1 else ''})")
        return f"{self.tokens_per_sec:,.0f} tok/s ({self.source}, not measured here)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def measured_speed(samples: list[SpeedSample]) -> Speed | None:
    """The median speed and fixed cost of ``samples``; None when there are none."""
    if not samples:
        return None
    return Speed(statistics.median(s.tokens_per_sec for s in samples),
                 statistics.median(s.overhead_s for s in samples), "measured", len(samples))


def profile_speed(throughput: dict[str, float], kind: str, hero_file: str) -> Speed | None:
    """The figure a hero's YAML gives for ``kind`` (``cpu_tokens_per_sec``, ``gpu_tokens_per_sec``), labelled as
    such; None when it gives none."""
    key = "cpu_tokens_per_sec" if kind == "cpu" else "gpu_tokens_per_sec" if kind.startswith("gpu") else None
    value = throughput.get(key) if key else None
    return Speed(float(value), 0.0, f"hero profile {hero_file}") if value else None
