"""Errors of campaigns."""

from config.errors import GuildError


class CampaignError(GuildError):
    """Raised when a campaign is missing, misnamed or inconsistent."""


class UnknownCampaign(CampaignError):
    """Raised when no campaign has the requested name."""


class ExportError(CampaignError):
    """Raised when a campaign cannot be exported: the target exists, there is no checkpoint, or it cannot be read."""
