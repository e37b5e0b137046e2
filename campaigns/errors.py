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


class EvalSetRejected(CampaignError):
    """Raised when an eval set or a probes file cannot be a campaign's yardstick: one ``FILE:LINE: problem`` (or bad
    option) per line. Nothing was changed."""


class EvalBudgetExceeded(CampaignError):
    """Raised when a campaign's eval set has more tokens than a job's ``hyperparams.eval_max_tokens`` allows; the
    message gives both numbers and the fix. Nothing was enqueued or changed."""


class CompareError(CampaignError):
    """Raised when ``campaigns compare`` cannot resolve a side (no such checkpoint, no eval set to compare on)."""
