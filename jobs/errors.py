"""Errors of the job store and the job state machine."""

from config.errors import GuildError


class JobError(GuildError):
    """Base of job errors."""


class UnknownJob(JobError):
    """Raised when no job has the requested id."""


class IllegalTransition(JobError):
    """Raised when a status change is not allowed by the Job state machine (e.g. completed → processing)."""


class DuplicateDataset(JobError):
    """Raised when a dataset's content is already queued, running or completed (use --force to enqueue anyway)."""


class NotOwner(IllegalTransition):
    """Raised when a worker writes to a job it no longer runs: the job was taken over (its worker stalled past the
    stale window) or ended meanwhile. The writer must drop its results; the current owner's stand."""


class PlanMismatch(JobError):
    """Raised when a job's frozen plan no longer fits its campaign (the locked architecture block differs)."""


class StoreLayoutError(JobError):
    """Raised when a Guild key in Redis holds the wrong type (written by something else, e.g. a queue name); the
    store refuses to write rather than leave a half-done change. ``python -m doctor`` lists every such key."""
