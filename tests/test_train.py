"""The Celery task (tasks/train.py): a delivery that Redis broke is given back, never acked away."""

from __future__ import annotations

import pytest
import redis
from celery.exceptions import Reject

import tasks.train as train


class _Runner:
    store = None

    def __init__(self, exc):
        self.exc = exc

    def run(self, job_id, republish, emit=None):
        raise self.exc


@pytest.mark.parametrize("exc", [redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
                                 redis.TimeoutError("Timeout reading from socket")])
def test_a_delivery_broken_by_redis_gives_its_message_back(monkeypatch, exc):
    # Acked like any failed task, the message of a job that was neither claimed nor sent again would be its only one:
    # the job would wait in `queued` forever (the fleet benchmark lost a job this way at a Redis kill -9).
    monkeypatch.setattr(train, "_runner", _Runner(exc))
    with pytest.raises(Reject) as raised:
        train.train_job.run("20261129T120000_a")
    assert raised.value.requeue is True


def test_a_bug_is_not_redelivered_forever(monkeypatch):
    monkeypatch.setattr(train, "_runner", _Runner(KeyError("plan")))
    with pytest.raises(KeyError):
        train.train_job.run("20261129T120000_a")
