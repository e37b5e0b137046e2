"""Errors of hero profiles."""

from config.errors import GuildError


class HeroError(GuildError):
    """Raised when a hero profile is missing, broken, or its model cannot be found."""


class UnknownHero(HeroError):
    """Raised when no profile has the requested id."""
