"""Why a queued job is not running yet: the waiting state, parked in the job store rather than spinning the broker.

A delivered job that may not start (an earlier job of its campaign goes first, the campaign is busy, or its retry
backoff has not passed) is *parked*: the store records a :class:`Wait` beside the job (``JobStore.park``) and the
worker acks the message without sending it again, so nothing loops through the broker and nothing shows as a
success. It gets a new message when the wait is over:

* campaign waits: the run that ends holds the campaign (completed, failed, requeued, cancelled...) wakes the
  campaign's first queued job after releasing the lock (``JobStore.wake_head``); each sweep does the same for every
  campaign with parked jobs, which covers every other way a campaign frees up (a cancelled head, a dead worker's
  lease running out);
* backoff waits: the worker's sweeper releases them when their time comes (``JobStore.release_due``, polled about
  once a second).

The state machine does not change: a waiting job is ``queued``; the wait is a runtime field of its record.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class WaitKind(str, Enum):
    CAMPAIGN = "campaign"  # an earlier job of its campaign goes first, or runs now
    BACKOFF = "backoff"  # a transient failure: not before ``until``

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Wait:
    """What a parked job waits for.

    Attributes:
        kind: campaign order or retry backoff.
        campaign: the job's campaign.
        after: the job it waits for (campaign waits): the one just ahead of it in its campaign, or the one holding
            the campaign.
        until: epoch seconds before which it must not start (backoff waits).
        since: epoch seconds it was parked at.
    """

    kind: WaitKind
    campaign: str
    after: str | None = None
    until: float | None = None
    since: float = 0.0

    @classmethod
    def for_campaign(cls, campaign: str, after: str | None, now: float | None = None) -> Wait:
        return cls(WaitKind.CAMPAIGN, campaign, after=after, since=time.time() if now is None else now)

    @classmethod
    def for_backoff(cls, campaign: str, until: float, now: float | None = None) -> Wait:
        return cls(WaitKind.BACKOFF, campaign, until=until, since=time.time() if now is None else now)

    def describe(self) -> str:
        """``after job X of campaign C`` or ``waiting for its retry backoff until 14:02:07`` (local time)."""
        if self.kind is WaitKind.BACKOFF:
            return f"waiting for its retry backoff until {clock_time(self.until)}"
        if self.after:
            return f"after job {self.after} of campaign {self.campaign}"
        return f"after the job that holds campaign {self.campaign}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value, "text": self.describe()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Wait | None:
        if not data:
            return None
        return cls(WaitKind(data["kind"]), data.get("campaign") or "", after=data.get("after"),
                   until=data.get("until"), since=float(data.get("since") or 0.0))


def clock_time(epoch_s: float | None) -> str:
    """``HH:MM:SS`` in local time (``?`` for None)."""
    return "?" if epoch_s is None else time.strftime("%H:%M:%S", time.localtime(epoch_s))
