"""Small typed records the job store returns besides :class:`jobs.job.Job` (both stores return the same ones)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from jobs.job import StopReason
from jobs.waiting import Wait

# The fields `jobs plan` needs of every queued job, kept in one hash so 10,000 jobs are read in one round trip.
SUMMARY_FIELDS = ("priority", "num_examples", "estimated_tokens", "hero_id", "campaign_id", "created_at", "workload")


@dataclass(frozen=True)
class JobRuntime:
    """What a running job's worker writes beside the Job record.

    Attributes:
        worker: the worker that claimed it last.
        heartbeat_at: epoch seconds of its last sign of life.
        retry_at: epoch seconds before which a requeued job must not start again (backoff).
        claim: the token of the run that owns the job now; every write of a run carries it (a fencing token).
        stop_request: what an operator (or the queue) asked the running job to do at its next step.
        waiting: why a queued job is parked (campaign order, retry backoff); None when it is not.
    """

    worker: str | None = None
    heartbeat_at: float | None = None
    retry_at: float | None = None
    claim: str | None = None
    stop_request: StopReason | None = None
    waiting: Wait | None = None


@dataclass(frozen=True)
class BeatReply:
    """The answer to one heartbeat: does this run still own its job, and was it asked to stop?"""

    owned: bool
    stop: StopReason | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A queue message no worker could run, moved aside so that it cannot stop the fleet."""

    at: str
    queue: str
    error: str
    headers: dict[str, Any] = field(default_factory=dict)
    body: str = ""  # the raw body: UTF-8 text, or "base64:" + base64 when it is not UTF-8
    body_bytes: int = 0  # its full length (the body kept is cut at MAX_DEAD_LETTER_BODY bytes)

    def raw_body(self) -> bytes:
        """The body as it was kept (cut at ``MAX_DEAD_LETTER_BODY`` bytes)."""
        if self.body.startswith("base64:"):
            return base64.b64decode(self.body[len("base64:"):])
        return self.body.encode("utf-8")

    @staticmethod
    def encode_body(raw: bytes, limit: int) -> str:
        kept = raw[:limit]
        try:
            return kept.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(kept).decode("ascii")


MAX_DEAD_LETTER_BODY = 64 * 1024


@dataclass(frozen=True)
class ServerHealth:
    """What ``doctor`` checks of the Redis server (read with INFO, which every Guild user may run)."""

    aof_enabled: bool
    eviction_policy: str
    version: str = ""
