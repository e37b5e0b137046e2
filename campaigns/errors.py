"""Errors of campaigns."""

from config.errors import GuildError


class CampaignError(GuildError):
    """Raised when a campaign is missing, misnamed or inconsistent."""


class UnknownCampaign(CampaignError):
    """Raised when no campaign has the requested name."""
