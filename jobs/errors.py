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
