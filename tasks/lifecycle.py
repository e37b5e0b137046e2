"""One job's life on a worker: claim → train → complete | fail | skip | requeue.

The Celery task in :mod:`tasks.train` is a thin wrapper around :class:`JobRunner`; everything here is
plain Python over the job store, the campaign store and the engine, so it can be read top to bottom.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from campaigns.campaign import CampaignStore
from campaigns.lock import CampaignLock
from config.code_version import git_commit
from config.errors import GuildError
from config.layers import resolve_job_config
from config.locked import build_locked_config, locked_differences
from config.settings import Settings
from jobs import keys
from jobs.job import JobStatus, utc_now
from jobs.store import JobStore

logger = logging.getLogger(__name__)
RETRY_BASE_DELAY_S = 5.0
RETRY_MAX_DELAY_S = 300.0


def is_transient(exc: BaseException) -> bool:
    """Failures worth another attempt: the GPU ran out of memory, Redis blipped, a file system hiccup."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    return name in ("OutOfMemoryError",) or "CUDA out of memory" in str(exc) or "CUDA error" in str(exc)


@dataclass
class Outcome:
    """What happened to one delivery of a job's message."""

    action: str  # "completed" | "failed" | "skipped" | "cancelled" | "requeued" | "deferred" | "dropped"
    detail: str = ""


class _Heartbeat(threading.Thread):
    """Keeps the job's heartbeat fresh and the campaign lease renewed while the engine trains."""

    def __init__(self, store: JobStore, job_id: str, lock: CampaignLock, interval_s: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.store, self.job_id, self.lock, self.interval_s = store, job_id, lock, interval_s
        self.progress: dict[str, Any] | None = None
        self.lock_lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.store.heartbeat(self.job_id, self.progress)
                if not self.lock.renew():
                    self.lock_lost = True
                    logger.error("job %s: lost its campaign lock; stopping at the next step", self.job_id)
            except redis.RedisError as exc:  # a Redis blip: keep training, try again next beat
                logger.warning("job %s: heartbeat failed: %s", self.job_id, exc)

    def stop(self) -> None:
        self._stop_event.set()


class JobRunner:
    """Runs jobs on one worker. Keeps one :class:`engine.trainer.TrainerEngine` warm across jobs."""

    def __init__(self, settings: Settings, store: JobStore, worker_name: str, engine=None):
        self.settings = settings
        self.store = store
        self.worker_name = worker_name
        self.campaigns = CampaignStore(settings.guild_home)
        self._engine = engine
        # Beat well inside the stale window, or a sweep would take a live job for a lost one.
        self.heartbeat_s = min(keys.DEFAULT_HEARTBEAT_S, settings.heartbeat_stale_s / 3)

    @property
    def engine(self):
        if self._engine is None:
            from engine.trainer import TrainerEngine  # imported in the worker child only: torch stays out of CLIs

            self._engine = TrainerEngine(verbose=self.settings.verbose)
        return self._engine

    # --------------------------------------------------------------------------------------------- the run

    def run(self, job_id: str, republish, emit=None) -> Outcome:
        """Run one delivery of ``job_id``'s message.

        Args:
            republish: ``republish(job_id, priority)`` sends the job's message again (used when its campaign is
                busy with another job, or when it goes back to its queue).
            emit: ``emit(progress_dict)`` publishes progress to monitoring (Flower task events); optional.
        """
        self._emit = emit
        try:
            job = self.store.get(job_id)
        except GuildError as exc:
            logger.error("dropping message for %s: %s", job_id, exc)
            return Outcome("dropped", str(exc))
        if job.status != JobStatus.QUEUED and job.status != JobStatus.PROCESSING:
            return Outcome("dropped", f"job is {job.status.value}")

        # ---- one campaign, one worker, in queue order -----------------------------------------------------
        # A job may start only when it is the first queued job of its campaign and it holds the campaign lock;
        # otherwise it goes back to its queue after a short pause, so this worker can take other campaigns' jobs.
        retry_at = self.store.runtime(job_id).get("retry_at")
        if job.status == JobStatus.QUEUED and retry_at and retry_at > time.time():
            time.sleep(min(keys.DEFAULT_DEFER_DELAY_S, retry_at - time.time()))
            republish(job_id, job.priority)
            return Outcome("deferred", "waiting for its retry backoff")
        if job.status == JobStatus.QUEUED and not self._is_campaign_head(job.campaign_id, job_id):
            time.sleep(keys.DEFAULT_DEFER_DELAY_S)
            republish(job_id, job.priority)
            return Outcome("deferred", "an earlier job of its campaign goes first")
        # The lease matches the heartbeat window: a worker silent that long loses its job and its lock together.
        lock = CampaignLock(self.store.redis, job.campaign_id, holder=f"{self.worker_name}:{job_id}",
                            lease_s=self.settings.heartbeat_stale_s)
        if not lock.acquire():
            time.sleep(keys.DEFAULT_DEFER_DELAY_S)
            republish(job_id, job.priority)
            return Outcome("deferred", f"campaign {job.campaign_id} is busy ({lock.holder()})")
        try:
            claimed = self.store.claim(job_id, self.worker_name, stale_after_s=self.settings.heartbeat_stale_s)
            if claimed is None:
                return Outcome("dropped", "already running elsewhere or finished")
            return self._train(claimed, lock, republish)
        finally:
            lock.release()

    def _is_campaign_head(self, campaign_id: str, job_id: str) -> bool:
        pending = [i.decode() for i in self.store.redis.zrange(keys.CAMPAIGN_PENDING.format(id=campaign_id), 0, -1)]
        for other in pending:
            if other == job_id:
                return True
            try:
                if self.store.get(other).status == JobStatus.QUEUED:
                    return False
            except GuildError:
                continue
        return True

    def _train(self, job, lock: CampaignLock, republish) -> Outcome:
        from engine.errors import DatasetInvalid
        from tasks.sweeper import max_attempts_of

        if job.attempts > max_attempts_of(job):
            self._fail(job, f"gave up after {job.attempts - 1} attempts (queue.max_attempts); last error: "
                            f"{job.last_error}")
            return Outcome("failed", "too many attempts")
        self.store.redis.hdel(keys.JOB.format(id=job.id), "stop_request")
        beat = _Heartbeat(self.store, job.id, lock, self.heartbeat_s)
        beat.start()
        try:
            plan = self._prepare(job)
            from campaigns.disk import ensure_checkpoint_space

            ensure_checkpoint_space(plan["checkpoint_dir"], plan["campaign"], plan["model_path"],
                                    plan["config"].hyperparams.save_total_limit)
            self.store.update(job.id, config_hash=plan["config_hash"], git_commit=git_commit(),
                              start_step=plan["start_step"],
                              metadata={**job.metadata, "config": plan["config"].to_dict(),
                                        "resume_from": str(plan["resume_from"]) if plan["resume_from"] else None})
            started = time.time()

            prefetch = {"started": False}

            def on_progress(step, total_steps, loss, lr, tokens_per_sec, eta_s):
                if not prefetch["started"]:
                    # Only once training runs: by then the model and tokenizer modules are imported, and
                    # transformers' lazy imports are not thread-safe.
                    prefetch["started"] = True
                    self._prepare_next_in_background(job)
                beat.progress = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr,
                                 "tokens_per_sec": tokens_per_sec, "eta_s": eta_s, "updated_at": time.time()}
                tracker.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_sec": tokens_per_sec}, step)
                self.store.heartbeat(job.id, beat.progress)
                if self._emit is not None:
                    self._emit(beat.progress)

            from tasks.tracking import CampaignTracker

            tracker = CampaignTracker(plan["checkpoint_dir"].parent.parent, job.id)
            plan["tracker"] = tracker
            control = _StopCheck(self.store, job.id, beat)
            result = self.engine.run_job(
                plan["dataset_path"], plan["config"], on_progress, control.should_stop,
                model_path=plan["model_path"], checkpoint_dir=plan["checkpoint_dir"],
                resume_from=plan["resume_from"], run_id=job.id, enable_packing=self.settings.enable_packing)
            logger.info("job %s: engine returned %s after %.1f s", job.id, result.status, time.time() - started)
            return self._finish(job, plan, result, control, republish)
        except DatasetInvalid as exc:
            self.store.transition(job.id, JobStatus.SKIPPED, reason="data invalid at train time",
                                  fields={"last_error": str(exc), "finished_at": utc_now(), "progress": None})
            return Outcome("skipped", str(exc))
        except GuildError as exc:
            self._fail(job, str(exc))
            return Outcome("failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - any crash of the engine becomes the job's error, with traceback
            text = f"{type(exc).__name__}: {exc}"
            logger.exception("job %s crashed", job.id)
            if is_transient(exc) and self._retry_later(job, text, republish):
                return Outcome("requeued", f"transient: {text}")
            self._fail(job, text, traceback.format_exc())
            return Outcome("failed", text)
        finally:
            beat.stop()

    # ----------------------------------------------------------------------------------------- preparation

    def _prepare(self, job) -> dict[str, Any]:
        """Resolve hero, campaign, config and locked block; find where training resumes from."""
        from engine.checkpoint import latest_checkpoint, read_checkpoint_state
        from heroes.materialise import ensure_model
        from heroes.profile import load_hero

        hero = load_hero(job.hero_id, self.settings.guild_home)
        campaign = self.campaigns.get(job.campaign_id)
        resolved = resolve_job_config(self.settings.guild_home, hero, campaign.config_overrides,
                                      job.metadata.get("config_sets") or {})
        config = resolved.config
        locked = build_locked_config(hero, hero.model_path(self.settings.guild_home), config.hyperparams.max_length,
                                     hero.version)
        diffs = locked_differences(campaign.locked, locked)
        if diffs:
            raise _LockedMismatch(f"the locked architecture differs from campaign {campaign.id}'s: "
                                  + "; ".join(diffs) + ". Start a new campaign for the changed hero.")
        model_path = ensure_model(hero, self.settings.guild_home)
        checkpoint_root = self.campaigns.checkpoint_root(campaign)
        own = latest_checkpoint(checkpoint_root / job.id)
        resume_from = own or (Path(campaign.latest_checkpoint) if campaign.latest_checkpoint else None)
        start_step = read_checkpoint_state(resume_from)["global_step"] if resume_from else 0
        return {"config": config, "config_hash": config.config_hash(), "model_path": model_path,
                "checkpoint_dir": checkpoint_root / job.id, "resume_from": resume_from, "start_step": start_step,
                "dataset_path": job.dataset_path, "campaign": campaign}

    def _prepare_next_in_background(self, job) -> None:
        """Tokenise and pack the campaign's next queued job while this one trains, so the next starts at once.

        The next job of a campaign usually lands on this worker (it holds the warm model); if it lands
        elsewhere, the work here was only wasted, never wrong.
        """
        pending = [i.decode() for i in self.store.redis.zrange(keys.CAMPAIGN_PENDING.format(id=job.campaign_id),
                                                               0, -1)]
        upcoming = [i for i in pending if i != job.id]
        if not upcoming:
            return

        def prepare() -> None:
            try:
                nxt = self.store.get(upcoming[0])
                if nxt.status != JobStatus.QUEUED:
                    return
                plan = self._prepare(nxt)
                self.engine.prepare(nxt.dataset_path, plan["config"], model_path=plan["model_path"],
                                    enable_packing=self.settings.enable_packing)
                logger.info("job %s: data of the next job %s prepared", job.id, nxt.id)
            except Exception as exc:  # noqa: BLE001 - an optimisation only; the job prepares its own data
                logger.info("job %s: next job not prepared ahead: %s", job.id, exc)

        threading.Thread(target=prepare, daemon=True, name=f"prepare-after-{job.id}").start()

    # ------------------------------------------------------------------------------------------- endings

    def _finish(self, job, plan, result, control: _StopCheck, republish) -> Outcome:
        for step, val_loss in result.val_history:
            plan["tracker"].log({"val/loss": val_loss}, step)
        plan["tracker"].close()
        artifacts = self._write_plots(job, plan, result)
        fields = {"final_step": result.final_step, "final_loss": result.final_loss,
                  "final_val_loss": result.final_val_loss, "trained_tokens": result.trained_tokens,
                  "tokens_per_sec": result.tokens_per_sec, "start_step": result.start_step,
                  "finished_at": utc_now(), "progress": None}
        meta = {**self.store.get(job.id).metadata, "checkpoint": result.checkpoint_path,
                "num_truncated": result.num_truncated, "num_dropped": result.num_dropped,
                "num_train_examples": result.num_train_examples, "num_val_examples": result.num_val_examples,
                "loss_history": result.loss_history[-2000:], "val_history": result.val_history}
        fields["metadata"] = meta
        fields["artifacts"] = artifacts
        if result.status == "completed":
            current = self.store.get(job.id)
            if current.status != JobStatus.PROCESSING or self.store.runtime(job.id)["worker"] != self.worker_name:
                # This worker stalled long enough for its job to be taken over: the other run owns the campaign.
                logger.error("job %s: finished here but now %s elsewhere; keeping the campaign as it is",
                             job.id, current.status.value)
                return Outcome("dropped", "taken over while stalled")
            with self.campaigns.edit(job.campaign_id) as campaign:
                campaign.current_step = result.final_step
                campaign.latest_checkpoint = result.checkpoint_path
                campaign.config_hash = plan["config_hash"]
                campaign.code_version = git_commit()
                if job.id not in campaign.job_ids:
                    campaign.job_ids.append(job.id)
            self.store.transition(job.id, JobStatus.COMPLETED, reason="trained", fields=fields)
            from campaigns.retention import apply_retention

            try:  # bounded disk: the campaign's checkpoint policy, now that this job's final is the latest
                apply_retention(self.campaigns, job.campaign_id, self.store)
            except Exception as exc:  # noqa: BLE001 - pruning must never fail a trained job
                logger.warning("job %s: checkpoint retention failed: %s", job.id, exc)
            return Outcome("completed")
        if result.status == "stopped":
            if control.reason == "cancel":
                self.store.transition(job.id, JobStatus.CANCELLED, reason="cancelled while running", fields=fields)
                return Outcome("cancelled")
            # Paused or preempted: back to the head of its queue, resuming from the checkpoint just written.
            # It did not fail, so this attempt does not count against queue.max_attempts.
            fields["finished_at"] = None
            self.store.transition(job.id, JobStatus.QUEUED, reason=f"stopped ({control.reason}); resumes from "
                                  f"step {result.final_step}", fields=fields,
                                  update=lambda j: {"attempts": max(j.attempts - 1, 0)})
            republish(job.id, job.priority, at_head=True)
            return Outcome("requeued", control.reason or "stopped")
        self._fail(job, result.error or "training failed", fields=fields)
        return Outcome("failed", result.error or "")

    def _write_plots(self, job, plan, result) -> dict[str, str]:
        """The job's loss curve as a PNG beside the campaign's checkpoints."""
        try:
            from jobs.plots import write_loss_plot

            campaign_dir = plan["checkpoint_dir"].parent.parent
            path = campaign_dir / "plots" / f"{plan['checkpoint_dir'].name}.png"
            write_loss_plot(path, result.loss_history, result.val_history, title=f"{job.id} ({job.campaign_id})")
            return {"loss_plot": str(path)}
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a trained job
            logger.warning("job %s: no loss plot: %s", job.id, exc)
            return {}

    def _retry_later(self, job, text: str, republish) -> bool:
        """Requeue after a transient failure with exponential backoff; False once max_attempts is used up."""
        from tasks.sweeper import max_attempts_of

        current = self.store.get(job.id)
        if current.attempts >= max_attempts_of(current):
            return False
        delay = min(RETRY_BASE_DELAY_S * 2 ** (current.attempts - 1), RETRY_MAX_DELAY_S)
        self.store.transition(job.id, JobStatus.QUEUED, reason=f"attempt {current.attempts} failed ({text[:300]}); "
                              f"retry in {delay:.0f} s", fields={"last_error": text, "progress": None,
                                                                  "retry_at": time.time() + delay})
        republish(job.id, job.priority)
        return True

    def _fail(self, job, text: str, tb: str | None = None, fields: dict | None = None) -> None:
        fields = dict(fields or {})
        fields.update({"last_error": text, "finished_at": utc_now(), "progress": None})
        if tb:
            meta = fields.get("metadata") or self.store.get(job.id).metadata
            fields["metadata"] = {**meta, "traceback": tb[-8000:]}
        self.store.transition(job.id, JobStatus.FAILED, reason=text[:500], fields=fields)


class _LockedMismatch(GuildError):
    """Raised when the job's locked block differs from its campaign's."""


class _StopCheck:
    """``should_stop`` for the engine: a cancel or pause request in Redis, or a lost campaign lock."""

    def __init__(self, store: JobStore, job_id: str, beat: _Heartbeat, poll_s: float = 1.0):
        self.store, self.job_id, self.beat, self.poll_s = store, job_id, beat, poll_s
        self.reason: str | None = None
        self._last = 0.0

    def should_stop(self) -> bool:
        if self.beat.lock_lost:
            self.reason = "campaign lock lost"
            return True
        now = time.time()
        if now - self._last < self.poll_s:  # one Redis round trip a second at most, not one per step
            return False
        self._last = now
        try:
            request = self.store.redis.hget(keys.JOB.format(id=self.job_id), "stop_request")
        except redis.RedisError:
            return False
        if request:
            self.reason = request.decode().strip('"')
            return True
        return False
