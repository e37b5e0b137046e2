"""The retry policy: which failures are worth another attempt, how many attempts a job gets, how long to wait.

One object answers every caller: the worker after a crash (``JobRunner._train``), the backoff of a requeue, the
sweeper and ``JobStore.claim`` when they take over a job whose worker went silent. ``attempts`` counts the runs a
job has started (each claim adds one); a pause or a preemption gives its attempt back.

==========================================================  ===========  =========================================
failure                                                     kind         what happens
==========================================================  ===========  =========================================
CUDA out of memory (``torch.cuda.OutOfMemoryError``, any    transient    requeued after a backoff, if attempts are
``... out of memory`` CUDA error); all CUDA devices busy                 left; else failed
a rank of a multi-rank job died, hung or lost a peer        transient    same: the retry resumes from the job's last
(``engine.gang.GangFailed``; any error whose class says                  checkpoint on a fresh gang (the failed one
``transient = True``)                                                    was torn down: no GPU is left held)
Redis or network blip (``redis.ConnectionError`` /          transient    same
``TimeoutError``, ``ConnectionError``, ``TimeoutError``,
kombu ``OperationalError``)
a wrong Redis password (``redis.AuthenticationError``)      permanent    failed: waiting will not fix it
CUDA device-side assert, illegal memory access, launch      poisoned     failed, and the worker process is replaced:
failure, ECC error, any other CUDA error                                 its CUDA context is unusable (every later
                                                                         CUDA call in it fails)
anything else (a bug, bad data the engine did not catch)    permanent    failed, with the traceback
the worker went silent for the stale window (killed,        takeover     requeued at once (the lost run's attempt
stalled)                                                                 was counted when it was claimed); failed
                                                                         when no attempt is left
==========================================================  ===========  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY_S = 5.0
DEFAULT_MAX_DELAY_S = 300.0

# Substrings of CUDA errors after which the process's CUDA context is unusable (CUDA calls keep failing).
_POISONING = ("device-side assert", "illegal memory access", "illegal instruction", "misaligned address",
              "unspecified launch failure", "launch failure", "uncorrectable ecc", "ecc error",
              "cublas_status_execution_failed", "cudnn_status_execution_failed", "an illegal", "hardware stack error")
_TRANSIENT_CUDA = ("out of memory", "busy or unavailable")


class FailureKind(str, Enum):
    TRANSIENT = "transient"  # worth another attempt after a pause, in the same process
    POISONED = "poisoned"  # the job fails and the worker process must be replaced
    PERMANENT = "permanent"  # the job fails; another attempt would fail the same way


class Action(str, Enum):
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    """What to do with a job after a failure or a takeover."""

    action: Action
    kind: FailureKind
    delay_s: float = 0.0  # RETRY: not before this many seconds
    replace_worker: bool = False  # the worker process must exit (a fresh one replaces it) after recording this
    reason: str = ""


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


@dataclass(frozen=True)
class RetryPolicy:
    """How the queue retries one job.

    Attributes:
        max_attempts: runs a job may start in all (``queue.max_attempts`` of its plan).
        base_delay_s: backoff after the first failed attempt; doubled after each further one.
        max_delay_s: the backoff never exceeds this.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay_s: float = DEFAULT_BASE_DELAY_S
    max_delay_s: float = DEFAULT_MAX_DELAY_S

    @classmethod
    def for_job(cls, job) -> RetryPolicy:
        """The policy of ``job``: its plan's ``queue.max_attempts`` (the default for a record without a plan)."""
        plan = getattr(job, "plan", None)
        return cls(max_attempts=plan.queue.max_attempts) if plan is not None else cls()

    # ------------------------------------------------------------------------------------------ the table

    @staticmethod
    def classify(exc: BaseException) -> FailureKind:
        """Which kind of failure ``exc`` is (see the module's table)."""
        names = _type_names(exc)
        text = str(exc).lower()
        if "AuthenticationError" in names or "AuthenticationWrongNumberOfArgsError" in names:
            return FailureKind.PERMANENT
        if getattr(type(exc), "transient", False) is True:  # says so itself (engine.gang.GangFailed)
            return FailureKind.TRANSIENT
        if "OutOfMemoryError" in names or "cuda out of memory" in text:
            return FailureKind.TRANSIENT
        cuda = "cuda" in text or "cublas" in text or "cudnn" in text or "AcceleratorError" in names
        if cuda:
            if any(s in text for s in _TRANSIENT_CUDA) and not any(s in text for s in _POISONING):
                return FailureKind.TRANSIENT
            return FailureKind.POISONED
        if names & {"ConnectionError", "TimeoutError", "OperationalError"}:
            return FailureKind.TRANSIENT  # redis.ConnectionError/TimeoutError, the builtins, kombu's
        return FailureKind.PERMANENT

    # -------------------------------------------------------------------------------------------- counting

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` runs have been started and no further one may start."""
        return attempts >= self.max_attempts

    def may_start(self, attempts: int) -> bool:
        """True when a run that has just been claimed as attempt number ``attempts`` may go ahead."""
        return attempts <= self.max_attempts

    def backoff_s(self, attempts: int) -> float:
        """The pause before the next attempt, after attempt number ``attempts`` failed (5, 10, 20, ... s)."""
        return min(self.base_delay_s * 2 ** max(attempts - 1, 0), self.max_delay_s)

    # ------------------------------------------------------------------------------------------- decisions

    def after_failure(self, exc: BaseException, attempts: int) -> Decision:
        """What to do after attempt number ``attempts`` raised ``exc``."""
        kind = self.classify(exc)
        if kind is FailureKind.POISONED:
            return Decision(Action.FAIL, kind, replace_worker=True,
                            reason="the CUDA context of this worker process is unusable; the process is replaced")
        if kind is FailureKind.PERMANENT:
            return Decision(Action.FAIL, kind)
        if self.exhausted(attempts):
            return Decision(Action.FAIL, kind, reason=f"gave up after {attempts} attempts (queue.max_attempts)")
        delay = self.backoff_s(attempts)
        return Decision(Action.RETRY, kind, delay_s=delay, reason=f"retry in {delay:.0f} s")

    def after_stale(self, attempts: int) -> Decision:
        """What to do with a job whose worker went silent during attempt number ``attempts``.

        A takeover costs no attempt of its own: the lost run was counted when it was claimed, and the next claim
        counts the next. So a job whose workers keep dying fails after ``max_attempts`` runs, like any other.
        """
        if self.exhausted(attempts):
            return Decision(Action.FAIL, FailureKind.TRANSIENT, reason=f"gave up after {attempts} attempts")
        return Decision(Action.RETRY, FailureKind.TRANSIENT)
