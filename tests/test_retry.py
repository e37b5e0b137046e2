"""The retry policy's table: what is transient, what poisons the process, attempts and backoff."""

import pytest
import redis
from kombu.exceptions import OperationalError

from jobs.retry import Action, FailureKind, RetryPolicy


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class AcceleratorError(RuntimeError):
    """Named like torch.AcceleratorError, which newer torch raises for CUDA errors."""


class GangFailed(RuntimeError):
    """Like engine.gang.GangFailed: says itself that it is transient (the gang is gone, its GPUs freed)."""

    transient = True


@pytest.mark.parametrize("exc,kind", [
    (OutOfMemoryError("Tried to allocate 2.00 GiB"), FailureKind.TRANSIENT),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), FailureKind.TRANSIENT),
    (RuntimeError("CUDA error: out of memory"), FailureKind.TRANSIENT),
    (RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable"), FailureKind.TRANSIENT),
    (redis.ConnectionError("Error 111 connecting"), FailureKind.TRANSIENT),
    (redis.TimeoutError("Timeout reading from socket"), FailureKind.TRANSIENT),
    (ConnectionResetError(104, "reset"), FailureKind.TRANSIENT),
    (TimeoutError("timed out"), FailureKind.TRANSIENT),
    (OperationalError("Error 111 connecting to broker"), FailureKind.TRANSIENT),
    (redis.AuthenticationError("invalid username-password pair"), FailureKind.PERMANENT),
    (RuntimeError("CUDA error: device-side assert triggered"), FailureKind.POISONED),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), FailureKind.POISONED),
    (RuntimeError("CUDA error: unspecified launch failure"), FailureKind.POISONED),
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), FailureKind.POISONED),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), FailureKind.POISONED),
    (AcceleratorError("CUDA error: misaligned address"), FailureKind.POISONED),
    (RuntimeError("CUDA error: some error never seen before"), FailureKind.POISONED),
    (GangFailed("rank 1 of 2 was killed by signal 9 (SIGKILL)"), FailureKind.TRANSIENT),
    (GangFailed("rank 0 of 4 raised RuntimeError: CUDA error: an illegal memory access"), FailureKind.TRANSIENT),
    (ValueError("shape mismatch"), FailureKind.PERMANENT),
    (KeyError("input_ids"), FailureKind.PERMANENT),
])
def test_classification_table(exc, kind):
    assert RetryPolicy.classify(exc) is kind


def test_attempts_and_backoff():
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (0, 1, 2, 3, 4)] == [False, False, False, True, True]
    assert [policy.may_start(n) for n in (1, 3, 4)] == [True, True, False]
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert RetryPolicy(max_delay_s=30).backoff_s(10) == 30.0


def test_decisions():
    policy = RetryPolicy(max_attempts=2)
    oom = OutOfMemoryError("x")
    first = policy.after_failure(oom, 1)
    assert first.action is Action.RETRY and first.delay_s == 5.0 and not first.replace_worker
    last = policy.after_failure(oom, 2)
    assert last.action is Action.FAIL and "gave up after 2 attempts" in last.reason
    poisoned = policy.after_failure(RuntimeError("CUDA error: device-side assert triggered"), 1)
    assert poisoned.action is Action.FAIL and poisoned.replace_worker  # never retried, attempts or not
    assert policy.after_failure(ValueError("bad"), 1).action is Action.FAIL
    assert policy.after_stale(1).action is Action.RETRY and policy.after_stale(2).action is Action.FAIL


def test_the_policy_of_a_job_comes_from_its_plan():
    from types import SimpleNamespace

    from config.schema import QueueConfig

    job = SimpleNamespace(plan=SimpleNamespace(queue=QueueConfig(max_attempts=7)))
    assert RetryPolicy.for_job(job).max_attempts == 7
    assert RetryPolicy.for_job(SimpleNamespace(plan=None)).max_attempts == 3


def test_the_gangs_own_failure_is_transient():
    from engine.gang import GangFailed as RealGangFailed

    failed = RealGangFailed(1, 2, "sent no heartbeat for 300 s (hung)")
    assert RetryPolicy.classify(failed) is FailureKind.TRANSIENT
    decision = RetryPolicy().after_failure(failed, attempts=1)
    assert decision.action is Action.RETRY and not decision.replace_worker and decision.delay_s == 5.0
