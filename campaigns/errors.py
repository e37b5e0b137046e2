"""Errors of campaigns."""

from config.errors import GuildError


class CampaignError(GuildError):
    """Raised when a campaign is missing, misnamed or inconsistent."""


class UnknownCampaign(CampaignError):
    """Raised when no campaign has the requested name."""


class ExportError(CampaignError):
    """Raised when a campaign cannot be exported: the target exists, there is no checkpoint, or it cannot be read."""


class RetentionPolicyError(CampaignError):
    """Raised when a campaign's checkpoint retention policy has a bad value."""


class InsufficientDisk(CampaignError):
    """Raised when a job cannot start because its checkpoints would not fit on the disk."""


class DiskSizeError(CampaignError):
    """Raised when a size given on the command line (``doctor --min-free``) cannot be read."""
