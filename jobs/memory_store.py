"""An in-memory job store with the interface of :class:`jobs.store.JobStore`, for unit tests of the lifecycle.

Same methods, same signatures, same errors, same state machine (``tests/test_store.py`` runs one contract against
both and checks the signatures match). One lock makes every method atomic, as a Redis transaction is. Nothing is
persisted; integration tests use the real Redis store.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.clock import utc_now
from jobs.errors import DuplicateDataset, IllegalTransition, UnknownJob
from jobs.history import JobHistoryLog
from jobs.job import ACTIVE, FIELDS, Job, JobStatus, StopReason, check_transition, id_variant
from jobs.queues import DEFAULT_HEARTBEAT_STALE_S, PRIORITIES
from jobs.records import (
    MAX_DEAD_LETTER_BODY,
    SUMMARY_FIELDS,
    BeatReply,
    DeadLetter,
    JobRuntime,
    ServerHealth,
)
from jobs.retry import Action, RetryPolicy
from jobs.speeds import SAMPLES_KEPT, SpeedSample, device_kind, sample_of
from jobs.store import LIVE_STATUSES, RUNTIME_FIELDS, _check_owner, history_record, queue_score
from jobs.waiting import Wait, WaitKind

logger = logging.getLogger(__name__)
DEAD_LETTERS_KEPT = 1000


class MemoryJobStore:
    """Jobs in a Python dict. Args as :class:`jobs.store.JobStore`, without a Redis client."""

    def __init__(self, guild_home: Path | None = None, clock: Callable[[], float] = time.time):
        self.history_log = JobHistoryLog(guild_home) if guild_home is not None else None
        self._clock = clock
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._runtime: dict[str, dict[str, Any]] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._created: dict[str, float] = {}
        self._owners: dict[str, set[str]] = {}
        self._unpublished: dict[str, float] = {}
        self._waiting: dict[str, Wait] = {}  # parked jobs
        self._speeds: dict[tuple[str, str], list[SpeedSample]] = {}  # (hero, device kind) → newest first
        self._locks: dict[str, tuple[str, float]] = {}  # campaign → (token, expires at)
        self._workers: dict[str, float] = {}
        self._paused: set[str] = set()
        self._dead: list[DeadLetter] = []
        self._seq = 0
        self.messages: dict[str, list[str]] = {q: [] for q in PRIORITIES}  # job ids, head first (tests publish here)

    @classmethod
    def connect(cls, url: str, guild_home: Path, *, worker: bool = False) -> MemoryJobStore:
        return cls(guild_home)

    def _log(self, record: dict[str, Any]) -> None:
        if self.history_log is not None:
            self.history_log.append(record)

    # ----------------------------------------------------------------------------------------------- create

    def create(self, job: Job, dataset_sha256: str, force: bool = False) -> Job:
        with self._lock:
            if not force:
                earlier = self.live_owner(dataset_sha256)
                if earlier:
                    raise DuplicateDataset(
                        f"{job.metadata.get('source_path', job.dataset_path)}: same content as job {earlier} "
                        f"(already {self._jobs[earlier].status.value}); use --force to train on it again")
            base_id = job.id
            n = 1
            while id_variant(base_id, n) in self._jobs:
                n += 1
            job.id = id_variant(base_id, n)
            self._seq += 1
            job.metadata = {**job.metadata, "seq": self._seq, "dataset_sha256": dataset_sha256}
            self._jobs[job.id] = copy.deepcopy(job)
            self._runtime[job.id] = {}
            self._created[job.id] = self._clock()
            self._owners.setdefault(dataset_sha256, set()).add(job.id)
            self._unpublished[job.id] = self._clock()
            record = history_record(job.id, None, job.status, "enqueued", {})
            self._history[job.id] = [record]
        self._log(record)
        return job

    def delete(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return
            for table in (self._runtime, self._history, self._created, self._unpublished, self._waiting):
                table.pop(job_id, None)
            self._owners.get(job.metadata.get("dataset_sha256", ""), set()).discard(job_id)

    def live_owner(self, sha256: str) -> str | None:
        with self._lock:
            for job_id in sorted(self._owners.get(sha256, ())):
                job = self._jobs.get(job_id)
                if job is not None and job.status in LIVE_STATUSES:
                    return job_id
        return None

    # ------------------------------------------------------------------------------------------------ read

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(f"no job with id {job_id!r} (python -m jobs list shows them)")
            return copy.deepcopy(self._jobs[job_id])

    def runtime(self, job_id: str) -> JobRuntime:
        with self._lock:
            values = dict(self._runtime.get(job_id, {}))
        stop = values.get("stop_request")
        return JobRuntime(**{k: values.get(k) for k in RUNTIME_FIELDS if k not in ("stop_request", "waiting")},
                          stop_request=StopReason(stop) if stop else None, waiting=values.get("waiting"))

    def runtimes(self, ids: list[str]) -> dict[str, JobRuntime]:
        return {job_id: self.runtime(job_id) for job_id in ids}

    def exists(self, job_id: str) -> bool:
        return job_id in self._jobs

    def list(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        with self._lock:
            ids = sorted(self._jobs, key=lambda i: (self._created[i], i))
            if status:
                ids = [i for i in ids if self._jobs[i].status.value == status]
        if limit is not None:
            ids = ids[-limit:]
        return self.get_many(ids)

    def get_many(self, ids: list[str]) -> list[Job]:
        with self._lock:
            return [copy.deepcopy(self._jobs[i]) for i in ids if i in self._jobs]

    def _score(self, job: Job) -> float:
        return queue_score(job.priority, int(job.metadata.get("seq", 0)))

    def queued_in_order(self) -> list[str]:
        with self._lock:
            queued = [j for j in self._jobs.values() if j.status == JobStatus.QUEUED]
        return [j.id for j in sorted(queued, key=lambda j: (self._score(j), j.id))]

    def queue_summaries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": i, **{f: getattr(self._jobs[i], f) for f in SUMMARY_FIELDS}} for i in self.queued_in_order()]

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            return {s.value: sum(1 for j in self._jobs.values() if j.status == s) for s in JobStatus}

    def history(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._history.get(job_id, []))

    # ---------------------------------------------------------------------------------------------- change

    def transition(self, job_id: str, target: JobStatus, *, expected: set[JobStatus] | None = None,
                   fields: dict[str, Any] | None = None, reason: str = "",
                   update: Callable[[Job], dict[str, Any]] | None = None, owner: str | None = None,
                   guard: Callable[[Job, JobRuntime], None] | None = None) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(f"no job with id {job_id!r}")
            job = self._jobs[job_id]
            _check_owner(job_id, job.status, self._runtime[job_id].get("claim"), owner)
            if guard is not None:
                guard(copy.deepcopy(job), self.runtime(job_id))
            if expected is not None and job.status not in expected:
                raise IllegalTransition(
                    f"job {job_id} is {job.status.value}, not {' or '.join(sorted(s.value for s in expected))}")
            check_transition(job_id, job.status, target)
            changes = dict(fields or {})
            if update is not None:
                changes.update(update(copy.deepcopy(job)))
            changes["status"] = target
            changes["waiting"] = None
            record = history_record(job_id, job.status, target, reason, changes)
            source = job.status
            self._waiting.pop(job_id, None)
            if target == JobStatus.COMPLETED:
                sample = sample_of(job_id, job.started_at, changes.get("finished_at"), changes.get("trained_tokens"),
                                   changes.get("tokens_per_sec"))
                if sample is not None:
                    kept = self._speeds.setdefault((job.hero_id, device_kind(self._runtime[job_id].get("worker"))), [])
                    kept.insert(0, sample)
                    del kept[SAMPLES_KEPT:]
            self._apply(job_id, changes)
            self._history[job_id].append(record)
            result = copy.deepcopy(self._jobs[job_id])
        self._log(record)
        logger.info("job %s: %s → %s%s", job_id, source.value, target.value, f" ({reason})" if reason else "")
        return result

    def _apply(self, job_id: str, changes: dict[str, Any]) -> None:
        job = self._jobs[job_id]
        for k, v in changes.items():
            if k in RUNTIME_FIELDS:
                self._runtime[job_id][k] = v.value if isinstance(v, StopReason) else v
            elif k in FIELDS:
                setattr(job, k, copy.deepcopy(v))

    def speed_samples(self, hero_id: str, kind: str) -> list[SpeedSample]:
        with self._lock:
            return list(self._speeds.get((hero_id, kind), []))

    def claim(self, job_id: str, worker: str, *, token: str | None = None,
              stale_after_s: float = DEFAULT_HEARTBEAT_STALE_S,
              policy: RetryPolicy | None = None) -> Job | None:
        job = self.get(job_id)
        if job.status == JobStatus.PROCESSING and self.take_over_stale(job_id, stale_after_s, policy) is not \
                JobStatus.QUEUED:
            return None
        try:
            return self.transition(
                job_id, JobStatus.PROCESSING, expected={JobStatus.QUEUED}, reason=f"claimed by {worker}",
                fields={"started_at": utc_now(), "finished_at": None, "worker": worker, "heartbeat_at": self._clock(),
                        "claim": token or uuid.uuid4().hex, "stop_request": None},
                update=lambda j: {"attempts": j.attempts + 1})
        except IllegalTransition:
            return None

    def take_over_stale(self, job_id: str, stale_after_s: float, policy: RetryPolicy | None = None,
                        resend: bool = False) -> JobStatus | None:
        with self._lock:
            try:
                job = self.get(job_id)
            except UnknownJob:
                return None
            rt = self.runtime(job_id)
            if job.status != JobStatus.PROCESSING or (rt.heartbeat_at is not None
                                                      and self._clock() - rt.heartbeat_at < stale_after_s):
                return None
            reason = f"worker {rt.worker} lost: no heartbeat for {stale_after_s:.0f} s"
            decision = (policy or RetryPolicy.for_job(job)).after_stale(job.attempts)
            if decision.action is Action.FAIL:
                text = f"{reason}; {decision.reason}"
                self.transition(job_id, JobStatus.FAILED, reason=text,
                                fields={"last_error": text, "finished_at": utc_now(), "progress": None})
                return JobStatus.FAILED
            if resend:
                self.mark_unpublished(job_id)
            self.transition(job_id, JobStatus.QUEUED, reason=reason, fields={"progress": None, "last_error": reason})
            return JobStatus.QUEUED

    def update(self, job_id: str, *, owner: str | None = None, **fields: Any) -> None:
        if "status" in fields:
            raise ValueError("status changes go through JobStore.transition")
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(f"no job with id {job_id!r}")
            _check_owner(job_id, self._jobs[job_id].status, self._runtime[job_id].get("claim"), owner)
            self._apply(job_id, fields)

    def beat(self, job_id: str, token: str, progress: dict[str, Any] | None = None) -> BeatReply:
        with self._lock:
            rt = self._runtime.get(job_id)
            if rt is None or rt.get("claim") != token:
                return BeatReply(False)
            rt["heartbeat_at"] = self._clock()
            if progress is not None:
                self._jobs[job_id].progress = copy.deepcopy(progress)
            stop = rt.get("stop_request")
            return BeatReply(True, StopReason(stop) if stop else None)

    def stale_processing(self, stale_after_s: float) -> list[str]:
        now = self._clock()
        with self._lock:
            return [i for i, j in self._jobs.items() if j.status == JobStatus.PROCESSING and (
                self._runtime[i].get("heartbeat_at") is None
                or now - self._runtime[i]["heartbeat_at"] >= stale_after_s)]

    # ---------------------------------------------------------------------------------------- stop requests

    def request_stop(self, job_id: str, reason: StopReason) -> None:
        with self._lock:
            self._runtime.setdefault(job_id, {})["stop_request"] = StopReason(reason).value

    def stop_reason(self, job_id: str) -> StopReason | None:
        return self.runtime(job_id).stop_request

    def clear_stop(self, job_id: str) -> None:
        with self._lock:
            self._runtime.get(job_id, {}).pop("stop_request", None)

    # -------------------------------------------------------------------------------- publication bookkeeping

    def mark_unpublished(self, job_id: str) -> None:
        with self._lock:
            self._unpublished[job_id] = self._clock()

    def mark_published(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._unpublished.pop(job_id, None)

    def unpublished(self, older_than_s: float) -> list[str]:
        with self._lock:
            return sorted(i for i, t in self._unpublished.items() if t <= self._clock() - older_than_s)

    # --------------------------------------------------------------------------------------------- campaigns

    def campaign_pending(self, campaign_id: str) -> list[str]:
        with self._lock:
            active = [j for j in self._jobs.values() if j.campaign_id == campaign_id and j.status in ACTIVE]
        return [j.id for j in sorted(active, key=lambda j: (self._score(j), j.id))]

    def campaign_head(self, campaign_id: str) -> str | None:
        with self._lock:
            return next((i for i in self.campaign_pending(campaign_id) if self._jobs[i].status == JobStatus.QUEUED),
                        None)

    def _live_lock(self, campaign_id: str) -> tuple[str, float] | None:
        held = self._locks.get(campaign_id)
        if held is not None and held[1] <= self._clock():
            del self._locks[campaign_id]
            return None
        return held

    def acquire_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool:
        with self._lock:
            if self._live_lock(campaign_id) is not None:
                return False
            self._locks[campaign_id] = (token, self._clock() + lease_s)
            return True

    def renew_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool:
        with self._lock:
            held = self._live_lock(campaign_id)
            if held is None or held[0] != token:
                return False
            self._locks[campaign_id] = (token, self._clock() + lease_s)
            return True

    def release_campaign_lock(self, campaign_id: str, token: str) -> None:
        with self._lock:
            held = self._live_lock(campaign_id)
            if held is not None and held[0] == token:
                del self._locks[campaign_id]

    def campaign_lock_holder(self, campaign_id: str) -> str | None:
        with self._lock:
            held = self._live_lock(campaign_id)
            return held[0] if held else None

    def campaign_locks(self) -> dict[str, str]:
        with self._lock:
            return {c: self._locks[c][0] for c in list(self._locks) if self._live_lock(c) is not None}

    # ------------------------------------------------------------------------------------ waiting (parked) jobs

    def park(self, job_id: str, wait: Wait) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status != JobStatus.QUEUED:
                return False
            if wait.kind is WaitKind.CAMPAIGN and self._live_lock(wait.campaign) is None and \
                    self.campaign_head(wait.campaign) == job_id:
                return False
            self._waiting[job_id] = wait
            self._runtime[job_id]["waiting"] = wait
            return True

    def wake_head(self, campaign_id: str) -> str | None:
        with self._lock:
            if self._live_lock(campaign_id) is not None:
                return None
            head = self.campaign_head(campaign_id)
            wait = self._waiting.get(head) if head else None
            if wait is None or (wait.kind is WaitKind.BACKOFF and (wait.until or 0) > self._clock()):
                return None
            self._unpark(head)
            return head

    def release_due(self) -> list[str]:
        with self._lock:
            due = sorted((w.until or 0, i) for i, w in self._waiting.items()
                         if w.kind is WaitKind.BACKOFF and (w.until or 0) <= self._clock())
            for _, job_id in due:
                self._unpark(job_id)
            return [i for _, i in due]

    def _unpark(self, job_id: str) -> None:
        del self._waiting[job_id]
        self._runtime[job_id]["waiting"] = None
        self._unpublished[job_id] = self._clock()

    def waiting(self) -> dict[str, Wait]:
        with self._lock:
            return dict(self._waiting)

    def waits(self, ids: list[str]) -> dict[str, Wait]:
        with self._lock:
            return {i: self._waiting[i] for i in ids if i in self._waiting}

    # ------------------------------------------------------------------------------------ workers and pausing

    def worker_seen(self, name: str) -> None:
        with self._lock:
            self._workers[name] = self._clock()

    def forget_worker(self, name: str) -> None:
        with self._lock:
            self._workers.pop(name, None)

    def workers(self) -> dict[str, float]:
        with self._lock:
            return dict(self._workers)

    def live_workers(self, stale_after_s: float) -> list[str]:
        now = self._clock()
        return sorted(n for n, seen in self.workers().items() if now - seen < stale_after_s)

    def pause_workers(self, names: list[str]) -> None:
        with self._lock:
            self._paused.update(names)

    def resume_workers(self, names: list[str] | None = None) -> None:
        with self._lock:
            if names is None:
                self._paused.clear()
            else:
                self._paused.difference_update(names)

    def paused_workers(self) -> set[str]:
        with self._lock:
            return set(self._paused)

    def is_paused(self, name: str) -> bool:
        return name in self._paused

    # ------------------------------------------------------------------------------------------ dead letters

    def dead_letter(self, raw_body: bytes, headers: dict, error: str, queue: str) -> None:
        letter = DeadLetter(at=utc_now(), queue=queue, error=error[:2000], headers=dict(headers),
                            body=DeadLetter.encode_body(raw_body, MAX_DEAD_LETTER_BODY), body_bytes=len(raw_body))
        with self._lock:
            self._dead.insert(0, letter)
            del self._dead[DEAD_LETTERS_KEPT:]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            return list(self._dead[:limit])

    def dead_letter_count(self) -> int:
        return len(self._dead)

    def clear_dead_letters(self) -> int:
        with self._lock:
            count = len(self._dead)
            self._dead.clear()
        return count

    # ------------------------------------------------------------------------- the queue messages (kombu lists)

    def message_counts(self) -> dict[str, int]:
        with self._lock:
            return {q: len(self.messages[q]) for q in PRIORITIES}

    def move_message_to_head(self, queue: str, job_id: str) -> bool:
        with self._lock:
            waiting = self.messages.setdefault(queue, [])
            if job_id not in waiting:
                return False
            waiting.remove(job_id)
            waiting.insert(0, job_id)
            return True

    # ---------------------------------------------------------------------------------------------- server

    def ping(self) -> None:
        return None

    def server_health(self) -> ServerHealth:
        return ServerHealth(aof_enabled=True, eviction_policy="noeviction", version="memory")

    def check_writable(self, campaign_id: str) -> None:
        return None

    def check_layout(self) -> list[str]:
        return []
