"""The Redis job store: the one source of truth about every Job, and the only code that knows Guild's Redis keys.

Each job is a Redis hash (one JSON-encoded value per field, plus runtime fields) and index entries; every status
change goes through :meth:`JobStore.transition`, which WATCHes the job, checks the state machine and writes the
record, the indexes and the history together. Everything else Guild keeps in Redis (stop requests, the campaign
lease, the worker registry, the dead-letter list, the queue messages' order) is read and written here too, so the
layout (:mod:`jobs.keys`) has one owner. :class:`jobs.memory_store.MemoryJobStore` implements the same interface
in memory, for unit tests of the lifecycle.

Every multi-key write is one Lua script (run inside MULTI after the WATCH) that first checks the Redis type of
every key it is about to write and writes nothing when one is wrong: MULTI alone does not roll back, so a key of
the wrong type (a list written by some other program under a Guild name) used to leave a half-written job.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from config.clock import utc_now
from jobs import keys
from jobs import redis_scripts as scripts
from jobs.errors import DuplicateDataset, IllegalTransition, NotOwner, StoreLayoutError, UnknownJob
from jobs.history import JobHistoryLog
from jobs.job import ACTIVE, FIELDS, Job, JobStatus, StopReason, check_transition, id_variant
from jobs.queues import DEFAULT_HEARTBEAT_STALE_S, PRIORITIES, PRIORITY_RANK, celery_key
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
from jobs.waiting import Wait, WaitKind

logger = logging.getLogger(__name__)

# kept in the job's hash beside the Job fields, not part of the record
RUNTIME_FIELDS = ("worker", "heartbeat_at", "retry_at", "claim", "stop_request", "waiting")
LIVE_STATUSES = (JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.COMPLETED)  # hold their content (duplicates)

# Socket settings of the clients: a worker must never hang on a half-open connection (it would stop beating).
CLI_CLIENT = {"socket_connect_timeout": 5, "socket_timeout": 30}
WORKER_CLIENT = {"socket_connect_timeout": 5, "socket_timeout": 5, "health_check_interval": 15,
                 "socket_keepalive": True, "retry_on_timeout": False}

def _encode(value: Any) -> str:
    if isinstance(value, (JobStatus, StopReason)):
        value = value.value
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.dumps(value, default=str)


def _decode_hash(raw: dict) -> dict[str, Any]:
    return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def queue_score(priority: str, seq: int) -> float:
    """Where a job sorts among queued ones: priority first, then enqueue order."""
    return PRIORITY_RANK[priority] * keys.PRIORITY_SCORE_SCALE + seq


def history_record(job_id: str, source: JobStatus | None, target: JobStatus, reason: str,
                   changes: dict[str, Any]) -> dict[str, Any]:
    """One history entry (shared by both stores)."""
    interesting = {k: v for k, v in changes.items() if k in ("attempts", "last_error", "start_step", "final_step",
                                                             "final_loss", "worker")}
    return {"job_id": job_id, "at": utc_now(), "from": source.value if source else None, "to": target.value,
            "reason": reason, **interesting}


def expected_type(key: str) -> str | None:
    """The Redis type a Guild key must have, or None for a key that is not Guild's."""
    if key.startswith(keys.PREFIX + "job:"):
        return "list" if key.endswith(":history") else "hash"
    if key.startswith(keys.JOBS_BY_STATUS.format(status="")):
        return "set"
    if key.startswith(keys.DATASET_OWNER.format(sha="")):
        return "set"
    if key.startswith(keys.SPEEDS.format(hero="", kind="").rstrip(":")):
        return "list"
    if key.startswith(keys.PREFIX + "campaign:"):
        return "string" if key.endswith(":lock") else "zset" if key.endswith(":pending") else None
    return keys.TYPES.get(key)


class _Ops:
    """The writes of one checked transaction: ``op("zadd", key, score, member)``; keys are numbered for Lua."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.ops: list[list[Any]] = []

    def __call__(self, command: str, key: str, *args: Any) -> _Ops:
        if key not in self.keys:
            self.keys.append(key)
        self.ops.append([command, self.keys.index(key) + 1, *(str(a) for a in args)])
        return self


class JobStore:
    """Jobs (and everything else Guild keeps) in Redis.

    Args:
        client: a redis client; prefer :meth:`connect`, which sets the socket timeouts.
        guild_home: where the JSONL history lives.
        clock: epoch seconds (``time.time``); injectable for tests.
    """

    def __init__(self, client: redis.Redis, guild_home: Path, clock: Callable[[], float] = time.time):
        self._redis = client
        self.history_log = JobHistoryLog(guild_home)
        self._clock = clock
        self._shas: dict[str, str] = {}

    @classmethod
    def connect(cls, url: str, guild_home: Path, *, worker: bool = False) -> JobStore:
        """A store on ``url``. ``worker=True``: short socket timeouts and health checks, so a Redis that stops
        answering makes a command fail within seconds (and the caller try again) instead of hanging."""
        return cls(redis.Redis.from_url(url, **(WORKER_CLIENT if worker else CLI_CLIENT)), guild_home)

    # ------------------------------------------------------------------------------------------ plumbing

    def _script(self, name: str, text: str) -> str:
        if name not in self._shas:
            self._shas[name] = self._redis.script_load(text)
        return self._shas[name]

    def _checked(self, pipe, ops: _Ops) -> None:
        """Queue ``ops`` as one checked write in the MULTI of ``pipe`` (the caller then executes)."""
        pipe.execute_command("EVALSHA", self._script("checked", scripts.CHECKED_WRITE), len(ops.keys), *ops.keys,
                             json.dumps(ops.ops))

    def _run_checked(self, pipe) -> None:
        """``pipe.execute()``, translating a wrong key type into StoreLayoutError (nothing was written)."""
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:
            self._shas.clear()  # Redis restarted (scripts are not persisted): load again, the caller retries
            raise redis.WatchError("script cache flushed") from None
        except redis.ResponseError as exc:
            raise _layout_error(exc) from None

    def _eval(self, name: str, text: str, nkeys: int, *args: Any):
        try:
            return self._redis.evalsha(self._script(name, text), nkeys, *args)
        except redis.exceptions.NoScriptError:
            self._shas.pop(name, None)
            return self._redis.evalsha(self._script(name, text), nkeys, *args)

    # ----------------------------------------------------------------------------------------------- create

    def _entries(self, job: Job, sha256: str) -> list[tuple[str, str, Any]]:
        """Every index entry of a job, as ``(redis type, key, score or value)``: what create writes and delete
        removes (one list, so an index added here can't be forgotten by the other)."""
        score = queue_score(job.priority, int(job.metadata.get("seq", 0)))
        summary = json.dumps({f: getattr(job, f) for f in SUMMARY_FIELDS})
        now = self._clock()
        return [
            ("zset", keys.JOBS_ALL, now),
            ("hash", keys.JOBS_SUMMARY, summary),
            ("set", keys.JOBS_BY_STATUS.format(status=job.status.value), None),
            ("zset", keys.JOBS_QUEUED, score),
            ("zset", keys.CAMPAIGN_PENDING.format(id=job.campaign_id), score),
            ("set", keys.DATASET_OWNER.format(sha=sha256), None),
            ("zset", keys.JOBS_UNPUBLISHED, now),  # until submit has sent its message
        ]

    def create(self, job: Job, dataset_sha256: str, force: bool = False) -> Job:
        """Store a new queued job under a unique id (``-2``, ``-3``... appended on collision).

        The record, its indexes, its history entry and the duplicate-detection entry are written in one checked
        transaction: all of them, or (on any error, a wrong key type included) none.

        Raises:
            DuplicateDataset: unless ``force``, when the same content is queued, processing or completed.
            StoreLayoutError: a Guild key has the wrong type; nothing was written.
        """
        base_id = job.id
        for n in range(1, 10_000):
            job.id = id_variant(base_id, n)
            owner_key = keys.DATASET_OWNER.format(sha=dataset_sha256)
            job_key = keys.JOB.format(id=job.id)
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key, owner_key)
                    if pipe.exists(job_key):
                        pipe.unwatch()
                        continue
                    if not force:
                        earlier = self._live_owner(pipe, pipe.smembers(owner_key))
                        if earlier:
                            pipe.unwatch()
                            raise DuplicateDataset(
                                f"{job.metadata.get('source_path', job.dataset_path)}: same content as job {earlier} "
                                f"(already {self.get(earlier).status.value}); use --force to train on it again")
                    seq = int(pipe.incr(keys.JOB_SEQ))  # outside MULTI is fine: a gap in seq is harmless
                    job.metadata = {**job.metadata, "seq": seq, "dataset_sha256": dataset_sha256}
                    record = history_record(job.id, None, job.status, "enqueued", {})
                    ops = _Ops()
                    ops("hset", job_key, *_flat_mapping({f: _encode(getattr(job, f)) for f in FIELDS}))
                    for kind, key, value in self._entries(job, dataset_sha256):
                        if kind == "zset":
                            ops("zadd", key, repr(value), job.id)
                        elif kind == "hash":
                            ops("hset", key, job.id, value)
                        else:
                            ops("sadd", key, job.id)
                    ops("rpush", keys.JOB_HISTORY.format(id=job.id), json.dumps(record))
                    pipe.multi()
                    self._checked(pipe, ops)
                    self._run_checked(pipe)
                except redis.WatchError:
                    continue
            self.history_log.append(record)
            return job
        raise RuntimeError("could not find a free job id")  # pragma: no cover

    def delete(self, job_id: str) -> None:
        """Remove a job and every index entry of it (the rollback of an enqueue that could not finish)."""
        try:
            job = self.get(job_id)
        except UnknownJob:
            return
        sha = job.metadata.get("dataset_sha256", "")
        with self._redis.pipeline() as pipe:
            pipe.delete(keys.JOB.format(id=job.id), keys.JOB_HISTORY.format(id=job.id))
            for kind, key, _value in self._entries(job, sha):
                {"zset": pipe.zrem, "set": pipe.srem, "hash": pipe.hdel}[kind](key, job.id)
            for status in JobStatus:
                pipe.srem(keys.JOBS_BY_STATUS.format(status=status.value), job.id)
            pipe.zrem(keys.JOBS_WAITING, job.id)
            pipe.execute(raise_on_error=False)

    def _live_owner(self, client, ids: Iterable[bytes]) -> str | None:
        for raw in sorted(ids):
            job_id = _text(raw)
            status = client.hget(keys.JOB.format(id=job_id), "status")
            if status and json.loads(status) in [s.value for s in LIVE_STATUSES]:
                return job_id
        return None

    def live_owner(self, sha256: str) -> str | None:
        """The job that holds this dataset content (queued, processing or completed), if any: a duplicate."""
        return self._live_owner(self._redis, self._redis.smembers(keys.DATASET_OWNER.format(sha=sha256)))

    # ------------------------------------------------------------------------------------------------ read

    def get(self, job_id: str) -> Job:
        raw = self._redis.hgetall(keys.JOB.format(id=job_id))
        if not raw:
            raise UnknownJob(f"no job with id {job_id!r} (python -m jobs list shows them)")
        return Job.from_dict(_decode_hash(raw))

    def runtime(self, job_id: str) -> JobRuntime:
        """The worker running the job, its last heartbeat (epoch seconds), its claim token and stop request."""
        values = self._redis.hmget(keys.JOB.format(id=job_id), *RUNTIME_FIELDS)
        return _runtime(dict(zip(RUNTIME_FIELDS, values)))

    def runtimes(self, ids: list[str]) -> dict[str, JobRuntime]:
        """The runtime fields of each of ``ids`` (one round trip)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.JOB.format(id=job_id), *RUNTIME_FIELDS)
            rows = pipe.execute()
        return {job_id: _runtime(dict(zip(RUNTIME_FIELDS, row))) for job_id, row in zip(ids, rows)}

    def exists(self, job_id: str) -> bool:
        return bool(self._redis.exists(keys.JOB.format(id=job_id)))

    def list(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, oldest first; only those of ``status`` when given."""
        if status:
            ids = [_text(i) for i in self._redis.smembers(keys.JOBS_BY_STATUS.format(status=status))]
            scores = self._redis.zmscore(keys.JOBS_ALL, ids) if ids else []
            ids = [i for _, i in sorted(zip([s or 0 for s in scores], ids))]
        else:
            ids = [_text(i) for i in self._redis.zrange(keys.JOBS_ALL, 0, -1)]
        if limit is not None:
            ids = ids[-limit:]
        return self.get_many(ids)

    def get_many(self, ids: list[str]) -> list[Job]:
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.JOB.format(id=job_id))
            raws = pipe.execute()
        return [Job.from_dict(_decode_hash(r)) for r in raws if r]

    def queued_in_order(self) -> list[str]:
        """Queued job ids in the order workers take them: priority, then enqueue order."""
        return [_text(i) for i in self._redis.zrange(keys.JOBS_QUEUED, 0, -1)]

    def queue_summaries(self) -> list[dict[str, Any]]:
        """``{"id", priority, num_examples, estimated_tokens, hero_id, campaign_id, created_at}`` of every queued
        job, in queue order: two round trips whatever the number of jobs (``jobs plan``)."""
        ids = self.queued_in_order()
        rows = self._redis.hmget(keys.JOBS_SUMMARY, ids) if ids else []
        return [{"id": job_id, **json.loads(row)} for job_id, row in zip(ids, rows) if row is not None]

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status."""
        with self._redis.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.scard(keys.JOBS_BY_STATUS.format(status=status.value))
            counts = pipe.execute()
        return {status.value: int(n) for status, n in zip(JobStatus, counts)}

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self._redis.lrange(keys.JOB_HISTORY.format(id=job_id), 0, -1)]

    # ---------------------------------------------------------------------------------------------- change

    def transition(self, job_id: str, target: JobStatus, *, expected: set[JobStatus] | None = None,
                   fields: dict[str, Any] | None = None, reason: str = "",
                   update: Callable[[Job], dict[str, Any]] | None = None, owner: str | None = None,
                   guard: Callable[[Job, JobRuntime], None] | None = None) -> Job:
        """Move a job to ``target`` and write ``fields`` with it, atomically.

        Args:
            expected: statuses the job must be in (else IllegalTransition), on top of the state machine.
            fields: Job fields (or runtime fields) to write in the same transaction.
            update: called with the current Job inside the transaction; returns more fields to write
                (for values that depend on the current record, like ``attempts + 1``).
            reason: kept in the history entry.
            owner: a claim token: the job must be processing under that claim (else NotOwner), so a run that
                lost its job (taken over while it stalled) can never overwrite the new owner's results.
            guard: called with the current Job and runtime inside the transaction; raises IllegalTransition to
                refuse (e.g. "the heartbeat is no longer stale").

        Raises:
            UnknownJob, IllegalTransition, NotOwner, StoreLayoutError.
        """
        job_key = keys.JOB.format(id=job_id)
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key)
                    raw = pipe.hgetall(job_key)
                    if not raw:
                        raise UnknownJob(f"no job with id {job_id!r}")
                    data = _decode_hash(raw)
                    job = Job.from_dict(data)
                    _check_owner(job_id, job.status, data.get("claim"), owner)
                    if guard is not None:
                        guard(job, _runtime_of({k: data.get(k) for k in RUNTIME_FIELDS}))
                    if expected is not None and job.status not in expected:
                        raise IllegalTransition(
                            f"job {job_id} is {job.status.value}, not {' or '.join(sorted(s.value for s in expected))}")
                    check_transition(job_id, job.status, target)
                    changes = dict(fields or {})
                    if update is not None:
                        changes.update(update(job))
                    changes["status"] = target
                    changes["waiting"] = None  # a status change ends any wait (a parked job is queued)
                    record = history_record(job_id, job.status, target, reason, changes)
                    ops = _Ops()
                    ops("hset", job_key, *_flat_mapping({k: _encode(v) for k, v in changes.items()}))
                    ops("zrem", keys.JOBS_WAITING, job_id)
                    self._reindex(ops, job, target)
                    if target == JobStatus.COMPLETED:
                        self._record_speed(ops, job, data.get("worker"), changes)
                    ops("rpush", keys.JOB_HISTORY.format(id=job_id), json.dumps(record, default=str))
                    pipe.multi()
                    self._checked(pipe, ops)
                    self._run_checked(pipe)
                except redis.WatchError:
                    continue
            self.history_log.append(record)
            logger.info("job %s: %s → %s%s", job_id, job.status.value, target.value, f" ({reason})" if reason else "")
            for k, v in changes.items():
                if hasattr(job, k):
                    setattr(job, k, v)
            return job

    def _reindex(self, ops: _Ops, job: Job, target: JobStatus) -> None:
        ops("srem", keys.JOBS_BY_STATUS.format(status=job.status.value), job.id)
        ops("sadd", keys.JOBS_BY_STATUS.format(status=target.value), job.id)
        score = repr(queue_score(job.priority, int(job.metadata.get("seq", 0))))
        if target == JobStatus.QUEUED:
            ops("zadd", keys.JOBS_QUEUED, score, job.id)
        else:
            ops("zrem", keys.JOBS_QUEUED, job.id)
        pending = keys.CAMPAIGN_PENDING.format(id=job.campaign_id)
        if target in ACTIVE:
            ops("zadd", pending, score, job.id)
        else:
            ops("zrem", pending, job.id)

    def _record_speed(self, ops: _Ops, job: Job, worker: str | None, changes: dict[str, Any]) -> None:
        """A completed run's speed, kept with its completion (the newest SAMPLES_KEPT per hero and device)."""
        sample = sample_of(job.id, job.started_at, changes.get("finished_at"), changes.get("trained_tokens"),
                           changes.get("tokens_per_sec"))
        if sample is not None:
            key = keys.SPEEDS.format(hero=job.hero_id, kind=device_kind(worker))
            ops("lpush", key, json.dumps(sample.to_dict()))
            ops("ltrim", key, 0, SAMPLES_KEPT - 1)

    def speed_samples(self, hero_id: str, kind: str) -> list[SpeedSample]:
        """The newest speed samples of ``hero_id`` on workers of ``kind`` (``jobs.speeds.device_kind``)."""
        raws = self._redis.lrange(keys.SPEEDS.format(hero=hero_id, kind=kind), 0, SAMPLES_KEPT - 1)
        return [SpeedSample(**json.loads(r)) for r in raws]

    def claim(self, job_id: str, worker: str, *, token: str | None = None,
              stale_after_s: float = DEFAULT_HEARTBEAT_STALE_S,
              policy: RetryPolicy | None = None) -> Job | None:
        """Take a queued job for ``worker``: queued → processing, attempts + 1, ``started_at`` now, claim ``token``.

        A job processing under a worker whose heartbeat is older than ``stale_after_s`` is first taken over
        (:meth:`take_over_stale`: requeued, or failed when the retry policy has no attempt left). Returns None when
        the job is not claimable (already running elsewhere, finished, cancelled, failed by the takeover): the
        caller drops that delivery, so one job never runs twice at once.
        """
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
        """A processing job whose worker has been silent for ``stale_after_s``: back to queued, or failed when its
        retry policy (``RetryPolicy.for_job`` unless given) says no attempt is left.

        Args:
            resend: the caller sends the job's message again afterwards: mark it unpublished in the same
                transaction, so a crash before the send is repaired by the next sweep.

        Returns:
            The new status, or None when the job was not stale (it beat meanwhile, or is no longer processing).
        """
        try:
            job = self.get(job_id)
            rt = self.runtime(job_id)
        except UnknownJob:
            return None
        if job.status != JobStatus.PROCESSING or (rt.heartbeat_at is not None
                                                  and self._clock() - rt.heartbeat_at < stale_after_s):
            return None
        reason = f"worker {rt.worker} lost: no heartbeat for {stale_after_s:.0f} s"
        decision = (policy or RetryPolicy.for_job(job)).after_stale(job.attempts)

        def still_stale(current: Job, now_rt: JobRuntime) -> None:  # re-checked inside the transaction
            if current.status != JobStatus.PROCESSING or now_rt.claim != rt.claim or (
                    now_rt.heartbeat_at is not None and self._clock() - now_rt.heartbeat_at < stale_after_s):
                raise IllegalTransition(f"job {job_id} beat again or changed hands; not taken over")

        try:
            if decision.action is Action.FAIL:
                text = f"{reason}; {decision.reason}"
                self.transition(job_id, JobStatus.FAILED, guard=still_stale, reason=text,
                                fields={"last_error": text, "finished_at": utc_now(), "progress": None})
                return JobStatus.FAILED
            if resend:
                self.mark_unpublished(job_id)
            self.transition(job_id, JobStatus.QUEUED, guard=still_stale, reason=reason,
                            fields={"progress": None, "last_error": reason})
            return JobStatus.QUEUED
        except IllegalTransition:
            return None

    def update(self, job_id: str, *, owner: str | None = None, **fields: Any) -> None:
        """Write non-status fields (``status`` goes through :meth:`transition`).

        Args:
            owner: a claim token: write only while that claim owns the job (else NotOwner).
        """
        if "status" in fields:
            raise ValueError("status changes go through JobStore.transition")
        if not fields:
            return
        mapping = {k: _encode(v) for k, v in fields.items()}
        job_key = keys.JOB.format(id=job_id)
        if owner is None:
            self._redis.hset(job_key, mapping=mapping)
            return
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key)
                    status, claim = pipe.hmget(job_key, "status", "claim")
                    _check_owner(job_id, JobStatus(json.loads(status)) if status else None,
                                 json.loads(claim) if claim else None, owner)
                    pipe.multi()
                    pipe.hset(job_key, mapping=mapping)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def beat(self, job_id: str, token: str, progress: dict[str, Any] | None = None) -> BeatReply:
        """A running job's sign of life (and its progress), written only while ``token`` owns the job; one round
        trip that also brings back the job's stop request."""
        owned, stop = self._eval("beat", scripts.BEAT, 1, keys.JOB.format(id=job_id), json.dumps(token),
                                 json.dumps(self._clock()), "" if progress is None else json.dumps(progress))
        return BeatReply(bool(owned), _stop_reason(stop))

    def stale_processing(self, stale_after_s: float) -> list[str]:
        """Ids of processing jobs whose worker has not sent a heartbeat for ``stale_after_s``."""
        ids = [_text(i) for i in self._redis.smembers(keys.JOBS_BY_STATUS.format(status="processing"))]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.JOB.format(id=job_id), "heartbeat_at")
            beats = pipe.execute()
        now = self._clock()
        return [job_id for job_id, hb in zip(ids, beats)
                if hb is None or json.loads(hb) is None or now - json.loads(hb) >= stale_after_s]

    # ---------------------------------------------------------------------------------------- stop requests

    def request_stop(self, job_id: str, reason: StopReason) -> None:
        """Ask the worker running ``job_id`` to checkpoint and stop at its next step."""
        self._redis.hset(keys.JOB.format(id=job_id), "stop_request", _encode(StopReason(reason)))

    def stop_reason(self, job_id: str) -> StopReason | None:
        return _stop_reason(self._redis.hget(keys.JOB.format(id=job_id), "stop_request"))

    def clear_stop(self, job_id: str) -> None:
        self._redis.hdel(keys.JOB.format(id=job_id), "stop_request")

    # -------------------------------------------------------------------------------- publication bookkeeping

    def mark_unpublished(self, job_id: str) -> None:
        """``job_id`` is queued and its message is about to be sent: until mark_published, the sweep resends it."""
        self._redis.zadd(keys.JOBS_UNPUBLISHED, {job_id: self._clock()})

    def mark_published(self, job_ids: list[str]) -> None:
        """The messages of ``job_ids`` are sent: the sweep need not send them again."""
        if job_ids:
            self._redis.zrem(keys.JOBS_UNPUBLISHED, *job_ids)

    def unpublished(self, older_than_s: float) -> list[str]:
        """Jobs created more than ``older_than_s`` ago whose message may never have been sent (enqueue died)."""
        ids = self._redis.zrangebyscore(keys.JOBS_UNPUBLISHED, "-inf", self._clock() - older_than_s)
        return [_text(i) for i in ids]

    # --------------------------------------------------------------------------------------------- campaigns

    def campaign_pending(self, campaign_id: str) -> list[str]:
        """The queued and processing jobs of a campaign, in queue order."""
        return [_text(i) for i in self._redis.zrange(keys.CAMPAIGN_PENDING.format(id=campaign_id), 0, -1)]

    def campaign_head(self, campaign_id: str) -> str | None:
        """The campaign's first queued job (the one that may start next), or None when none is queued."""
        return _campaign_head(self._redis, campaign_id)

    def acquire_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool:
        """Take the campaign's lease lock for ``token`` (False when someone else holds it)."""
        return bool(self._redis.set(keys.CAMPAIGN_LOCK.format(id=campaign_id), token, nx=True,
                                    px=int(lease_s * 1000)))

    def renew_campaign_lock(self, campaign_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease; False when ``token`` no longer holds it (expired, and maybe taken by someone else)."""
        return bool(self._eval("lock-renew", scripts.LOCK_RENEW, 1, keys.CAMPAIGN_LOCK.format(id=campaign_id), token,
                               int(lease_s * 1000)))

    def release_campaign_lock(self, campaign_id: str, token: str) -> None:
        self._eval("lock-release", scripts.LOCK_RELEASE, 1, keys.CAMPAIGN_LOCK.format(id=campaign_id), token)

    def campaign_lock_holder(self, campaign_id: str) -> str | None:
        """The token holding the campaign's lock, or None."""
        raw = self._redis.get(keys.CAMPAIGN_LOCK.format(id=campaign_id))
        return _text(raw) if raw else None

    def campaign_locks(self) -> dict[str, str]:
        """Every held campaign lock: campaign id → holder token."""
        prefix, suffix = keys.CAMPAIGN_LOCK.split("{id}")
        found = {}
        for key in self._redis.scan_iter(match=keys.CAMPAIGN_LOCK.format(id="*"), count=1000):
            value = self._redis.get(key)
            if value is not None:
                found[_text(key)[len(prefix):-len(suffix)]] = _text(value)
        return found

    # ------------------------------------------------------------------------------------ waiting (parked) jobs

    def park(self, job_id: str, wait: Wait) -> bool:
        """Record that the queued ``job_id`` waits (its message is then dropped, not sent again).

        Atomic with the campaign's state: a campaign wait is refused (False) when the job is, by now, the first
        queued job of its campaign and nobody holds the campaign, so a job can never park just after the wake-up
        meant for it; the caller then tries to start it at once. Also False when the job is no longer queued.
        """
        job_key = keys.JOB.format(id=job_id)
        pending = keys.CAMPAIGN_PENDING.format(id=wait.campaign)
        lock = keys.CAMPAIGN_LOCK.format(id=wait.campaign)
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key, pending, lock)
                    status = pipe.hget(job_key, "status")
                    if status is None or json.loads(status) != JobStatus.QUEUED.value:
                        pipe.unwatch()
                        return False
                    if wait.kind is WaitKind.CAMPAIGN and not pipe.exists(lock) and \
                            _campaign_head(pipe, wait.campaign) == job_id:
                        pipe.unwatch()
                        return False
                    ops = _Ops()
                    ops("hset", job_key, "waiting", _encode(wait))
                    ops("zadd", keys.JOBS_WAITING, _wake_score(wait), job_id)
                    pipe.multi()
                    self._checked(pipe, ops)
                    self._run_checked(pipe)
                    return True
                except redis.WatchError:
                    continue

    def wake_head(self, campaign_id: str) -> str | None:
        """When nobody holds ``campaign_id`` and its first queued job is parked (and not in a backoff), take it out
        of the waiting set, marked unpublished, and return its id: the caller sends its message (then
        ``mark_published``). None when there is nothing to wake."""
        pending = keys.CAMPAIGN_PENDING.format(id=campaign_id)
        lock = keys.CAMPAIGN_LOCK.format(id=campaign_id)
        while True:
            self._script("unpark", scripts.UNPARK)  # loaded before the MULTI that runs it
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(pending, lock)
                    head = None if pipe.exists(lock) else _campaign_head(pipe, campaign_id)
                    score = pipe.zscore(keys.JOBS_WAITING, head) if head else None
                    if score is None or (score != float("inf") and score > self._clock()):
                        pipe.unwatch()
                        return None
                    pipe.watch(keys.JOB.format(id=head))
                    pipe.multi()
                    self._unpark(pipe, head)
                    woken = pipe.execute()[0]
                    return head if woken else None
                except redis.WatchError:
                    continue
                except redis.exceptions.NoScriptError:
                    self._shas.pop("unpark", None)

    def release_due(self) -> list[str]:
        """Take every parked job whose backoff is over out of the waiting set, marked unpublished; returns their ids
        (the caller sends their messages, then ``mark_published``)."""
        ids = [_text(i) for i in self._redis.zrangebyscore(keys.JOBS_WAITING, "-inf", self._clock())]
        released = []
        for job_id in ids:
            if self._eval("unpark", scripts.UNPARK, 3, keys.JOBS_WAITING, keys.JOB.format(id=job_id),
                          keys.JOBS_UNPUBLISHED, job_id, self._clock()):
                released.append(job_id)
        return released

    def _unpark(self, pipe, job_id: str) -> None:
        pipe.evalsha(self._script("unpark", scripts.UNPARK), 3, keys.JOBS_WAITING, keys.JOB.format(id=job_id),
                     keys.JOBS_UNPUBLISHED, job_id, self._clock())

    def waiting(self) -> dict[str, Wait]:
        """Every parked job and what it waits for."""
        return self.waits([_text(i) for i in self._redis.zrange(keys.JOBS_WAITING, 0, -1)])

    def waits(self, ids: list[str]) -> dict[str, Wait]:
        """What each of ``ids`` waits for, for those that are parked (one round trip)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.JOB.format(id=job_id), "waiting")
            raws = pipe.execute()
        found = {job_id: Wait.from_dict(json.loads(raw)) for job_id, raw in zip(ids, raws) if raw}
        return {job_id: wait for job_id, wait in found.items() if wait is not None}

    # ------------------------------------------------------------------------------------ workers and pausing

    def worker_seen(self, name: str) -> None:
        """``name`` showed a sign of life now (its sweep)."""
        self._redis.hset(keys.WORKERS, name, self._clock())

    def forget_worker(self, name: str) -> None:
        self._redis.hdel(keys.WORKERS, name)

    def workers(self) -> dict[str, float]:
        """Every registered worker and the epoch seconds of its last sign of life."""
        return {_text(k): float(v) for k, v in self._redis.hgetall(keys.WORKERS).items()}

    def live_workers(self, stale_after_s: float) -> list[str]:
        """Workers that showed a sign of life within ``stale_after_s``."""
        now = self._clock()
        return sorted(name for name, seen in self.workers().items() if now - seen < stale_after_s)

    def pause_workers(self, names: list[str]) -> None:
        """Remember ``names`` as paused (a paused worker restarted stays paused)."""
        if names:
            self._redis.sadd(keys.CONTROL_PAUSED, *names)

    def resume_workers(self, names: list[str] | None = None) -> None:
        """Forget the pause of ``names`` (every worker when None)."""
        if names is None:
            self._redis.delete(keys.CONTROL_PAUSED)
        elif names:
            self._redis.srem(keys.CONTROL_PAUSED, *names)

    def paused_workers(self) -> set[str]:
        return {_text(n) for n in self._redis.smembers(keys.CONTROL_PAUSED)}

    def is_paused(self, name: str) -> bool:
        return bool(self._redis.sismember(keys.CONTROL_PAUSED, name))

    # ------------------------------------------------------------------------------------------ dead letters

    def dead_letter(self, raw_body: bytes, headers: dict, error: str, queue: str) -> None:
        """Keep a message no worker can run (undecodable, malformed) aside, newest first, the newest 1,000."""
        record = {"at": utc_now(), "queue": queue, "error": error[:2000], "headers": headers,
                  "body": DeadLetter.encode_body(raw_body, MAX_DEAD_LETTER_BODY), "body_bytes": len(raw_body)}
        with self._redis.pipeline() as pipe:
            pipe.lpush(keys.DEAD_LETTERS, json.dumps(record, default=repr))
            pipe.ltrim(keys.DEAD_LETTERS, 0, keys.DEAD_LETTERS_KEPT - 1)
            pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""
        return [DeadLetter(**json.loads(r)) for r in self._redis.lrange(keys.DEAD_LETTERS, 0, limit - 1)]

    def dead_letter_count(self) -> int:
        return int(self._redis.llen(keys.DEAD_LETTERS))

    def clear_dead_letters(self) -> int:
        """Forget every dead letter; returns how many there were."""
        with self._redis.pipeline() as pipe:
            pipe.llen(keys.DEAD_LETTERS)
            pipe.delete(keys.DEAD_LETTERS)
            count, _ = pipe.execute()
        return int(count)

    # ------------------------------------------------------------------------- the queue messages (kombu lists)

    def message_counts(self) -> dict[str, int]:
        """Messages waiting in each priority queue (kombu's lists live in this Redis too)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for queue in PRIORITIES:
                pipe.llen(celery_key(queue))
            counts = pipe.execute()
        return dict(zip(PRIORITIES, (int(c) for c in counts)))

    def move_message_to_head(self, queue: str, job_id: str) -> bool:
        """Put the waiting message of ``job_id`` before every other of ``queue``; False when it is not there."""
        raw = f'"id": "{job_id}"'
        escaped = '"id": ' + json.dumps(job_id)
        # kombu prefixes the keys of its own commands (global_keyprefix), not those of a script: name it in full.
        return bool(self._eval("to-head", scripts.MOVE_TO_HEAD, 1, celery_key(queue), raw, escaped))

    # ---------------------------------------------------------------------------------------------- server

    def ping(self) -> None:
        """Raises redis.RedisError when Redis cannot be reached (or refuses the password)."""
        self._redis.ping()

    def server_health(self) -> ServerHealth:
        persistence = self._redis.info("persistence")
        memory = self._redis.info("memory")
        server = self._redis.info("server")
        return ServerHealth(aof_enabled=str(persistence.get("aof_enabled")) == "1",
                            eviction_policy=str(memory.get("maxmemory_policy", "unknown")),
                            version=str(server.get("redis_version", "")))

    def check_writable(self, campaign_id: str) -> None:
        """Raise StoreLayoutError when a key an enqueue into ``campaign_id`` writes has the wrong type: one round
        trip, so a batch is refused before its datasets are stored or its campaign is created. (``create`` checks
        again, atomically, whatever happens in between.)"""
        probe = Job(id="-", dataset_path="", hero_id="", campaign_id=campaign_id, priority=PRIORITIES[0])
        wanted = [(key, expected_type(key)) for _kind, key, _value in self._entries(probe, "-")]
        wanted = [(k, t) for k, t in wanted if not k.startswith(keys.DATASET_OWNER.format(sha=""))]
        with self._redis.pipeline(transaction=False) as pipe:
            for key, _ in wanted:
                pipe.type(key)
            actual = [_text(t) for t in pipe.execute()]
        for (key, want), got in zip(wanted, actual):
            if got not in ("none", want):
                raise StoreLayoutError(_wrong_type_text(key, got, want) + "; nothing was written")

    def check_layout(self) -> list[str]:
        """One line per Guild key (or priority queue) whose Redis type is wrong, saying what to do."""
        found: list[str] = []
        names = [_text(k) for k in self._redis.scan_iter(match=keys.PREFIX + "*", count=1000)]
        checks = [(k, expected_type(k)) for k in names] + [(celery_key(q), "list") for q in PRIORITIES]
        checks = [(k, t) for k, t in checks if t is not None]
        for start in range(0, len(checks), 1000):
            batch = checks[start:start + 1000]
            with self._redis.pipeline(transaction=False) as pipe:
                for key, _ in batch:
                    pipe.type(key)
                actual = [_text(t) for t in pipe.execute()]
            for (key, want), got in zip(batch, actual):
                if got not in ("none", want):
                    found.append(_wrong_type_text(key, got, want))
        return found


# ------------------------------------------------------------------------------------------------ helpers


def _flat_mapping(mapping: dict[str, str]) -> list[str]:
    return [x for pair in mapping.items() for x in pair]


def _runtime(raw: dict[str, Any]) -> JobRuntime:
    """From the raw (JSON-encoded) runtime fields of a job's hash."""
    return _runtime_of({k: (json.loads(v) if v is not None else None) for k, v in raw.items()})


def _runtime_of(decoded: dict[str, Any]) -> JobRuntime:
    """From decoded runtime fields."""
    stop = decoded.get("stop_request")
    return JobRuntime(worker=decoded.get("worker"), heartbeat_at=decoded.get("heartbeat_at"),
                      retry_at=decoded.get("retry_at"), claim=decoded.get("claim"),
                      stop_request=StopReason(stop) if stop else None,
                      waiting=Wait.from_dict(decoded.get("waiting")))


def _campaign_head(client, campaign_id: str) -> str | None:
    """The first queued job of a campaign, read with ``client`` (the store's, or a pipeline in WATCH mode)."""
    ids = [_text(i) for i in client.zrange(keys.CAMPAIGN_PENDING.format(id=campaign_id), 0, -1)]
    for job_id in ids:
        status = client.hget(keys.JOB.format(id=job_id), "status")
        if status and json.loads(status) == JobStatus.QUEUED.value:
            return job_id
    return None


def _wake_score(wait: Wait) -> str:
    """A parked job's score in the waiting set: when its backoff ends, or never by time alone (campaign waits)."""
    return repr(float(wait.until)) if wait.kind is WaitKind.BACKOFF and wait.until is not None else "+inf"


def _stop_reason(raw) -> StopReason | None:
    if not raw:
        return None
    value = json.loads(raw)
    try:
        return StopReason(value) if value else None
    except ValueError:
        logger.warning("unknown stop request %r ignored", value)
        return None


def _check_owner(job_id: str, status: JobStatus | None, claim: str | None, owner: str | None) -> None:
    if owner is None:
        return
    if status != JobStatus.PROCESSING or claim != owner:
        raise NotOwner(f"job {job_id} is no longer run by this worker (now {status.value if status else 'gone'}); "
                       "its new owner's results stand")


def _wrong_type_text(key: str, actual: str, want: str) -> str:
    return (f"Redis key {key} is a {actual}, not a {want}: something other than Guild wrote it (a task sent with "
            f"that name as its queue?). Rename it aside (redis-cli RENAME {key} {key}.bad) and check what wrote it")


def _layout_error(exc: redis.ResponseError) -> Exception:
    text = str(exc)
    if "GUILDTYPE" in text:
        key, actual, want = text.split("GUILDTYPE", 1)[1].split()[:3]
        return StoreLayoutError(_wrong_type_text(key, actual, want) + "; nothing was written")
    return exc
