"""Errors raised while reading settings and resolving configuration."""

from __future__ import annotations


class GuildError(Exception):
    """Base class of every error Guild reports to a user as one clear line (the CLIs exit 2 on it)."""


class SettingsError(GuildError):
    """Raised when an environment variable holds a value Guild cannot use."""


class ConfigError(GuildError):
    """Raised when one or more config values are unknown, of the wrong type or out of range.

    All problems of one resolution are collected and reported together, one per line.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class LockedConfigMismatch(GuildError):
    """Raised when a job's locked architecture block differs from its campaign's."""
