"""The Redis job store: the one source of truth about every Job.

Each job is a Redis hash (one JSON-encoded value per field) plus index entries; every status change goes
through :meth:`JobStore.transition`, a WATCH/MULTI transaction that checks the state machine and writes the
record, the indexes and the history together.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

from jobs import keys
from jobs.errors import UnknownJob
from jobs.history import JobHistoryLog
from jobs.job import ACTIVE, FIELDS, Job, JobStatus, check_transition, utc_now

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("priority", "num_examples", "estimated_tokens", "hero_id", "campaign_id", "created_at")
# kept in the hash beside the Job fields, not part of the record
_RUNTIME_FIELDS = ("worker", "heartbeat_at", "retry_at")


def _encode(value: Any) -> str:
    return json.dumps(value.value if isinstance(value, JobStatus) else value, default=str)


def _decode_hash(raw: dict) -> dict[str, Any]:
    return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}


class JobStore:
    """Jobs in Redis.

    Args:
        client: a redis client (``redis.Redis.from_url(settings.redis_url)``).
        guild_home: where the JSONL history lives.
    """

    def __init__(self, client: redis.Redis, guild_home: Path):
        self.redis = client
        self.history_log = JobHistoryLog(guild_home)

    # ----------------------------------------------------------------------------------------------- create

    def create(self, job: Job, dataset_sha256: str, force: bool = False) -> Job:
        """Store a new queued job under a unique id (``-2``, ``-3``... appended on collision).

        The record, its indexes and the duplicate-detection entry are written in one transaction.
        Raises DuplicateDataset unless ``force`` when the same content is queued, processing or completed.
        """
        from jobs.errors import DuplicateDataset

        base_id = job.id
        for n in range(1, 10_000):
            job.id = base_id if n == 1 else f"{base_id}-{n}"
            owner_key = keys.DATASET_OWNER.format(sha=dataset_sha256)
            job_key = keys.JOB.format(id=job.id)
            with self.redis.pipeline() as pipe:
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
                    pipe.multi()
                    pipe.hset(job_key, mapping={f: _encode(getattr(job, f)) for f in FIELDS})
                    pipe.zadd(keys.JOBS_ALL, {job.id: time.time()})
                    pipe.hset(keys.JOBS_SUMMARY, job.id, json.dumps({f: getattr(job, f) for f in SUMMARY_FIELDS}))
                    pipe.sadd(keys.JOBS_BY_STATUS.format(status=job.status.value), job.id)
                    pipe.zadd(keys.JOBS_QUEUED, {job.id: keys.queue_score(job.priority, seq)})
                    pipe.zadd(keys.CAMPAIGN_PENDING.format(id=job.campaign_id),
                              {job.id: keys.queue_score(job.priority, seq)})
                    pipe.sadd(owner_key, job.id)
                    pipe.zadd(keys.JOBS_UNPUBLISHED, {job.id: time.time()})  # until submit has sent its message
                    record = self._history_record(job.id, None, job.status, "enqueued", {})
                    pipe.rpush(keys.JOB_HISTORY.format(id=job.id), json.dumps(record))
                    pipe.execute()
                except redis.WatchError:
                    continue
            self.history_log.append(record)
            return job
        raise RuntimeError("could not find a free job id")  # pragma: no cover

    def _live_owner(self, pipe, ids: Iterable[bytes]) -> str | None:
        for raw in sorted(ids):
            job_id = raw.decode()
            status = pipe.hget(keys.JOB.format(id=job_id), "status")
            if status and json.loads(status) in ("queued", "processing", "completed"):
                return job_id
        return None

    # ------------------------------------------------------------------------------------------------ read

    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(keys.JOB.format(id=job_id))
        if not raw:
            raise UnknownJob(f"no job with id {job_id!r} (python -m jobs list shows them)")
        return Job.from_dict(_decode_hash(raw))

    def runtime(self, job_id: str) -> dict[str, Any]:
        """The worker running the job and its last heartbeat (epoch seconds), if any."""
        values = self.redis.hmget(keys.JOB.format(id=job_id), *_RUNTIME_FIELDS)
        return {k: (json.loads(v) if v else None) for k, v in zip(_RUNTIME_FIELDS, values)}

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.JOB.format(id=job_id)))

    def list(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, oldest first; only those of ``status`` when given."""
        if status:
            ids = [i.decode() for i in self.redis.smembers(keys.JOBS_BY_STATUS.format(status=status))]
            scores = self.redis.zmscore(keys.JOBS_ALL, ids) if ids else []
            ids = [i for _, i in sorted(zip([s or 0 for s in scores], ids))]
        else:
            ids = [i.decode() for i in self.redis.zrange(keys.JOBS_ALL, 0, -1)]
        if limit is not None:
            ids = ids[-limit:]
        return self.get_many(ids)

    def get_many(self, ids: list[str]) -> list[Job]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.JOB.format(id=job_id))
            raws = pipe.execute()
        return [Job.from_dict(_decode_hash(r)) for r in raws if r]

    def queued_in_order(self) -> list[str]:
        """Queued job ids in the order workers take them: priority, then enqueue order."""
        return [i.decode() for i in self.redis.zrange(keys.JOBS_QUEUED, 0, -1)]

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.redis.lrange(keys.JOB_HISTORY.format(id=job_id), 0, -1)]

    # ---------------------------------------------------------------------------------------------- change

    def transition(self, job_id: str, target: JobStatus, *, expected: set[JobStatus] | None = None,
                   fields: dict[str, Any] | None = None, reason: str = "",
                   update: Callable[[Job], dict[str, Any]] | None = None) -> Job:
        """Move a job to ``target`` and write ``fields`` with it, atomically.

        Args:
            expected: statuses the job must be in (else IllegalTransition), on top of the state machine.
            fields: Job fields (or runtime fields ``worker``/``heartbeat_at``) to write in the same transaction.
            update: called with the current Job inside the transaction; returns more fields to write
                (for values that depend on the current record, like ``attempts + 1``).
            reason: kept in the history entry.

        Raises:
            UnknownJob, IllegalTransition.
        """
        from jobs.errors import IllegalTransition

        job_key = keys.JOB.format(id=job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(job_key)
                    raw = pipe.hgetall(job_key)
                    if not raw:
                        raise UnknownJob(f"no job with id {job_id!r}")
                    job = Job.from_dict(_decode_hash(raw))
                    if expected is not None and job.status not in expected:
                        raise IllegalTransition(
                            f"job {job_id} is {job.status.value}, not {' or '.join(sorted(s.value for s in expected))}")
                    check_transition(job_id, job.status, target)
                    changes = dict(fields or {})
                    if update is not None:
                        changes.update(update(job))
                    changes["status"] = target
                    record = self._history_record(job_id, job.status, target, reason, changes)
                    pipe.multi()
                    pipe.hset(job_key, mapping={k: _encode(v) for k, v in changes.items()})
                    self._reindex(pipe, job, target)
                    pipe.rpush(keys.JOB_HISTORY.format(id=job_id), json.dumps(record, default=str))
                    pipe.execute()
                except redis.WatchError:
                    continue
            self.history_log.append(record)
            logger.info("job %s: %s → %s%s", job_id, job.status.value, target.value, f" ({reason})" if reason else "")
            for k, v in changes.items():
                if hasattr(job, k):
                    setattr(job, k, v)
            return job

    def _reindex(self, pipe, job: Job, target: JobStatus) -> None:
        pipe.srem(keys.JOBS_BY_STATUS.format(status=job.status.value), job.id)
        pipe.sadd(keys.JOBS_BY_STATUS.format(status=target.value), job.id)
        score = keys.queue_score(job.priority, int(job.metadata.get("seq", 0)))
        if target == JobStatus.QUEUED:
            pipe.zadd(keys.JOBS_QUEUED, {job.id: score})
        else:
            pipe.zrem(keys.JOBS_QUEUED, job.id)
        pending = keys.CAMPAIGN_PENDING.format(id=job.campaign_id)
        if target in ACTIVE:
            pipe.zadd(pending, {job.id: score})
        else:
            pipe.zrem(pending, job.id)

    def _history_record(self, job_id: str, source: JobStatus | None, target: JobStatus, reason: str,
                        changes: dict[str, Any]) -> dict[str, Any]:
        interesting = {k: v for k, v in changes.items() if k in ("attempts", "last_error", "start_step", "final_step",
                                                                 "final_loss", "worker")}
        return {"job_id": job_id, "at": utc_now(), "from": source.value if source else None, "to": target.value,
                "reason": reason, **interesting}

    def claim(self, job_id: str, worker: str, stale_after_s: float = keys.DEFAULT_HEARTBEAT_STALE_S) -> Job | None:
        """Take a queued job for ``worker``: queued → processing, attempts + 1, ``started_at`` now.

        A job processing under a worker whose heartbeat is older than ``stale_after_s`` is first put back to
        queued (its worker died). Returns None when the job is not claimable (already running elsewhere,
        finished, cancelled): the caller drops that delivery, so one job never runs twice at once.
        """
        from jobs.errors import IllegalTransition

        job = self.get(job_id)
        if job.status == JobStatus.PROCESSING:
            rt = self.runtime(job_id)
            if rt["heartbeat_at"] is not None and time.time() - rt["heartbeat_at"] < stale_after_s:
                return None
            try:
                self.transition(job_id, JobStatus.QUEUED, expected={JobStatus.PROCESSING},
                                reason=f"worker {rt['worker']} lost (no heartbeat for {stale_after_s:.0f} s)",
                                fields={"progress": None})
            except IllegalTransition:
                return None
        try:
            return self.transition(
                job_id, JobStatus.PROCESSING, expected={JobStatus.QUEUED}, reason=f"claimed by {worker}",
                fields={"started_at": utc_now(), "finished_at": None, "worker": worker, "heartbeat_at": time.time()},
                update=lambda j: {"attempts": j.attempts + 1})
        except IllegalTransition:
            return None

    def mark_unpublished(self, job_id: str) -> None:
        """``job_id`` is queued and its message is about to be sent: until mark_published, the sweep resends it."""
        self.redis.zadd(keys.JOBS_UNPUBLISHED, {job_id: time.time()})

    def mark_published(self, job_ids: list[str]) -> None:
        """The messages of ``job_ids`` are sent: the sweep need not send them again."""
        if job_ids:
            self.redis.zrem(keys.JOBS_UNPUBLISHED, *job_ids)

    def unpublished(self, older_than_s: float) -> list[str]:
        """Jobs created more than ``older_than_s`` ago whose message may never have been sent (enqueue died)."""
        ids = self.redis.zrangebyscore(keys.JOBS_UNPUBLISHED, "-inf", time.time() - older_than_s)
        return [i.decode() for i in ids]

    def heartbeat(self, job_id: str, progress: dict[str, Any] | None = None) -> None:
        mapping = {"heartbeat_at": _encode(time.time())}
        if progress is not None:
            mapping["progress"] = _encode(progress)
        self.redis.hset(keys.JOB.format(id=job_id), mapping=mapping)

    def update(self, job_id: str, **fields: Any) -> None:
        """Write non-status fields (``status`` must go through :meth:`transition`)."""
        if "status" in fields:
            raise ValueError("status changes go through JobStore.transition")
        if fields:
            self.redis.hset(keys.JOB.format(id=job_id), mapping={k: _encode(v) for k, v in fields.items()})

    def stale_processing(self, stale_after_s: float = keys.DEFAULT_HEARTBEAT_STALE_S) -> list[str]:
        """Ids of processing jobs whose worker has not sent a heartbeat for ``stale_after_s``."""
        ids = [i.decode() for i in self.redis.smembers(keys.JOBS_BY_STATUS.format(status="processing"))]
        now = time.time()
        out = []
        for job_id in ids:
            hb = self.runtime(job_id)["heartbeat_at"]
            if hb is None or now - hb >= stale_after_s:
                out.append(job_id)
        return out

    # ------------------------------------------------------------------------------------------ dead letters
    # Minimal version written by the harden helper (tasks/poison.py calls it); the refactor helper's
    # JobStore.dead_letter with the same signature replaces it on merge.

    def dead_letter(self, raw_body: bytes, headers: dict, error: str, queue: str) -> None:
        """Keep a message no worker could run: its raw body (base64, at most ``DEAD_LETTER_BODY_BYTES``), headers,
        the error, its queue and the time. The newest ``DEAD_LETTERS_KEEP`` are kept."""
        import base64

        record = {"at": utc_now(), "queue": queue, "error": error, "headers": headers,
                  "body_bytes": len(raw_body),
                  "body_base64": base64.b64encode(raw_body[: keys.DEAD_LETTER_BODY_BYTES]).decode()}
        with self.redis.pipeline() as pipe:
            pipe.lpush(keys.DEAD_LETTERS, json.dumps(record, default=repr))
            pipe.ltrim(keys.DEAD_LETTERS, 0, keys.DEAD_LETTERS_KEEP - 1)
            pipe.execute()

    def dead_letters(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The dead letters, newest first (``body_base64`` holds the raw body)."""
        raw = self.redis.lrange(keys.DEAD_LETTERS, 0, -1 if limit is None else limit - 1)
        return [json.loads(r) for r in raw]

    def dead_letter_count(self) -> int:
        return int(self.redis.llen(keys.DEAD_LETTERS))

    def clear_dead_letters(self) -> int:
        """Forget every dead letter; returns how many there were."""
        with self.redis.pipeline() as pipe:
            pipe.llen(keys.DEAD_LETTERS)
            pipe.delete(keys.DEAD_LETTERS)
            count, _ = pipe.execute()
        return int(count)
