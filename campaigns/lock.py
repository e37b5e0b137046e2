"""The campaign lock: one campaign trains on one worker at a time, across machines.

A Redis key holding the holder's token with a lease (``PX``). The holder renews the lease while it trains;
a holder that dies stops renewing and the lease expires, so the campaign is never locked forever.
"""

from __future__ import annotations

import uuid

import redis

from jobs import keys

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class CampaignLock:
    """A lease lock on one campaign.

    Args:
        client: redis client.
        campaign_id: the campaign's name.
        holder: who holds it (worker name and job id), stored in the token for doctor.
        lease_s: how long the lock outlives its last renewal.
    """

    def __init__(self, client: redis.Redis, campaign_id: str, holder: str,
                 lease_s: float = keys.DEFAULT_CAMPAIGN_LEASE_S):
        self.redis = client
        self.key = keys.CAMPAIGN_LOCK.format(id=campaign_id)
        self.token = f"{holder}|{uuid.uuid4().hex}"
        self.lease_ms = int(lease_s * 1000)

    def acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.lease_ms))

    def renew(self) -> bool:
        """Extend the lease; False when the lock was lost (expired and taken by someone else)."""
        return bool(self.redis.eval(_RENEW, 1, self.key, self.token, self.lease_ms))

    def release(self) -> None:
        self.redis.eval(_RELEASE, 1, self.key, self.token)

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return raw.decode().split("|", 1)[0] if raw else None
