"""The campaign lock: one campaign trains on one worker at a time, across machines.

A lease held in the job store (``JobStore.acquire_campaign_lock``: a Redis key with the holder's token and a
``PX`` lease). The holder renews the lease while it trains; a holder that dies stops renewing and the lease
expires, so the campaign is never locked forever. The lock takes the store (anything with the four lease
methods), so this package knows nothing of Redis.
"""

from __future__ import annotations

import uuid
from typing import Protocol

DEFAULT_LEASE_S = 60.0


class Leases(Protocol):
    def acquire_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool: ...

    def renew_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool: ...

    def release_campaign_lock(self, campaign_id: str, token: str) -> None: ...

    def campaign_lock_holder(self, campaign_id: str) -> str | None: ...


def holder_of(token: str | None) -> str | None:
    """The holder part of a lock token (``worker:job``), for messages and ``doctor``."""
    return token.split("|", 1)[0] if token else None


class CampaignLock:
    """A lease lock on one campaign.

    Args:
        leases: the job store.
        campaign_id: the campaign's name.
        holder: who holds it (worker name and job id), kept in the token for ``doctor``.
        lease_s: how long the lock outlives its last renewal.
    """

    def __init__(self, leases: Leases, campaign_id: str, holder: str, lease_s: float = DEFAULT_LEASE_S):
        self.leases, self.campaign_id, self.lease_s = leases, campaign_id, lease_s
        self.token = f"{holder}|{uuid.uuid4().hex}"

    def acquire(self) -> bool:
        return self.leases.acquire_campaign_lock(self.campaign_id, self.token, self.lease_s)

    def renew(self) -> bool:
        """Extend the lease; False when the lock was lost (expired, and maybe taken by someone else)."""
        return self.leases.renew_campaign_lock(self.campaign_id, self.token, self.lease_s)

    def release(self) -> None:
        self.leases.release_campaign_lock(self.campaign_id, self.token)

    def holder(self) -> str | None:
        return holder_of(self.leases.campaign_lock_holder(self.campaign_id))
