"""One job's life on a worker: claim → train its frozen plan → complete | fail | skip | requeue.

The Celery task in :mod:`tasks.train` is a thin wrapper around :class:`JobRunner`; everything here is plain Python
over the job store, the campaign store and an engine, so it can be read top to bottom, and unit-tested with the
in-memory store and a stand-in engine.

The training thread never talks to Redis: progress goes into memory, and one beat thread per job writes it (at
most once a second), renews the campaign lease and brings back stop requests, catching every error. A Redis
outage shorter than the stale window therefore costs nothing: the job trains on and its next beat catches up.
Every write a run makes carries its claim token, so a run whose job was taken over while it stalled can never
overwrite the new owner's results (:class:`jobs.errors.NotOwner`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from campaigns.campaign import Campaign, CampaignStore
from campaigns.disk import ensure_checkpoint_space
from campaigns.lock import CampaignLock
from config.code_version import git_commit
from config.errors import GuildError
from config.settings import Settings
from engine.result import TrainingStatus
from jobs.errors import NotOwner
from jobs.job import Job, JobStatus, StopReason, utc_now
from jobs.publisher import Publisher
from jobs.queues import DEFAULT_DEFER_DELAY_S, DEFAULT_HEARTBEAT_S, PROGRESS_WRITE_INTERVAL_S
from jobs.retention import apply_retention
from jobs.retry import Action, RetryPolicy
from jobs.waiting import Wait
from tasks.engines import Engine, ResumePoint, load_engine
from tasks.evaluation import METADATA_KEY as EVAL_SET_KEY
from tasks.evaluation import EvalReporter, job_evaluation

logger = logging.getLogger(__name__)
PARK_TRIES = 3  # a job whose turn comes while it is being parked looks again, this many times


def _job_of_holder(holder: str | None) -> str | None:
    """The job in a campaign lock's holder (``worker:job``)."""
    return holder.split(":", 1)[1] if holder and ":" in holder else None


class OutcomeKind(str, Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # back to its queue (transient failure, pause, preemption, lost campaign lock)
    WAITING = "waiting"  # not its turn (campaign order, busy campaign, backoff): parked, its message dropped
    DEFERRED = "deferred"  # last resort when it could not be parked: its message went back to the queue
    DROPPED = "dropped"  # nothing to do (unknown, finished, running elsewhere, taken over)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery of a job's message."""

    action: OutcomeKind
    detail: str = ""
    replace_worker: bool = False  # this worker process must exit (its CUDA context is unusable)
    wait: Wait | None = None  # what a WAITING job waits for


@dataclass(frozen=True)
class Preparation:
    """What a run needs beyond the job's plan: where its model is, where it checkpoints and resumes."""

    campaign: Campaign
    model_path: str
    checkpoint_dir: Path
    resume: ResumePoint


class _Beat(threading.Thread):
    """While a job trains: writes its heartbeat and latest progress (throttled), renews the campaign lease and reads
    stop requests. Every error is logged and retried at the next beat: nothing here can stop training."""

    def __init__(self, store, job_id: str, token: str, lock: CampaignLock, interval_s: float, renew_every_s: float):
        super().__init__(daemon=True, name=f"beat-{job_id}")
        self.store, self.job_id, self.token, self.lock = store, job_id, token, lock
        self.interval_s, self.renew_every_s = interval_s, renew_every_s
        self.progress: dict[str, Any] | None = None  # set by the training thread; written here
        self.stop_reason: StopReason | None = None
        self._stop_event = threading.Event()
        self._renewed_at = time.monotonic()
        self._failures = 0

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.beat_once()

    def beat_once(self) -> None:
        try:
            reply = self.store.beat(self.job_id, self.token, self.progress)
            if not reply.owned:
                self._stop(StopReason.TAKEN_OVER, "was taken over by another worker (this one stalled)")
            elif reply.stop is not None and self.stop_reason is None:
                self.stop_reason = reply.stop
            if time.monotonic() - self._renewed_at >= self.renew_every_s:
                if self.lock.renew():
                    self._renewed_at = time.monotonic()
                else:
                    self._stop(StopReason.LOCK_LOST, "lost its campaign lock")
            if self._failures:
                logger.warning("job %s: beating again after %d failed beats", self.job_id, self._failures)
            self._failures = 0
        except Exception as exc:  # noqa: BLE001 - a Redis blip (or anything else): train on, beat again later
            self._failures += 1
            if self._failures == 1 or self._failures % 30 == 0:
                logger.warning("job %s: heartbeat failed (%d in a row): %s", self.job_id, self._failures, exc)

    def _stop(self, reason: StopReason, text: str) -> None:
        if self.stop_reason not in (StopReason.TAKEN_OVER, StopReason.LOCK_LOST):
            logger.error("job %s: %s; stopping at the next step", self.job_id, text)
            self.stop_reason = reason

    def should_stop(self) -> bool:
        """The engine's stop check: no I/O, only what the beat brought back."""
        return self.stop_reason is not None

    def stop(self) -> None:
        self._stop_event.set()


class JobRunner:
    """Runs jobs on one worker. Keeps one engine (and its loaded model) warm across jobs.

    Args:
        settings: the worker's settings (stale window, packing override, engine factory).
        store: the job store.
        worker_name: e.g. ``gpu0@host``.
        engine: the engine to train with; default :func:`tasks.engines.load_engine` (on first use).
        heartbeat_s: how often the campaign lease is renewed (default: a third of the stale window, at most 5 s).
        beat_s: how often progress and the heartbeat are written and stop requests read (default 1 s).
    """

    def __init__(self, settings: Settings, store, worker_name: str, engine: Engine | None = None,
                 heartbeat_s: float | None = None, beat_s: float = PROGRESS_WRITE_INTERVAL_S):
        self.settings = settings
        self.store = store
        self.worker_name = worker_name
        self.campaigns = CampaignStore(settings.guild_home)
        self._engine = engine
        # Beat well inside the stale window, or a sweep would take a live job for a lost one.
        self.heartbeat_s = heartbeat_s or min(DEFAULT_HEARTBEAT_S, settings.heartbeat_stale_s / 3)
        self.beat_s = min(beat_s, self.heartbeat_s)
        self._emit = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.settings)
        return self._engine

    # --------------------------------------------------------------------------------------------- the run

    def run(self, job_id: str, republish: Publisher, emit=None) -> Outcome:
        """Run one delivery of ``job_id``'s message.

        Args:
            republish: sends the job's message again (it goes back to its queue, or a parked job's turn came).
            emit: ``emit(progress_dict)`` publishes progress to monitoring (Flower task events); optional; must not
                block (:class:`tasks.train._ProgressEvents` hands it to a thread).
        """
        self._emit = emit
        try:
            job = self.store.get(job_id)
        except GuildError as exc:
            logger.error("dropping message for %s: %s", job_id, exc)
            return Outcome(OutcomeKind.DROPPED, str(exc))
        if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
            # A cancelled first job of a campaign may be what its parked jobs wait for.
            self._wake_campaign(job.campaign_id, republish)
            return Outcome(OutcomeKind.DROPPED, f"job is {job.status.value}")

        # ---- one campaign, one worker, in queue order -----------------------------------------------------
        # A job may start only when it is the first queued job of its campaign and it holds the campaign lock;
        # otherwise it is parked in the store (jobs/waiting.py) and its message is dropped: the run that frees the
        # campaign (or the sweep) sends it again, so the worker takes other jobs meanwhile and nothing spins.
        if job.status == JobStatus.QUEUED:
            # This delivery holds the job's only message, and it is acked when the task ends, even when it fails
            # (Redis killed mid-way): until the job is claimed or parked, it is marked unpublished, so the sweep
            # sends it again if neither happens (this worker killed, Redis killed).
            self.store.mark_unpublished(job_id)
        # The lease outlives the heartbeat window by a sweep round: a worker silent for the window loses its job to
        # the sweep, which releases the lock with it; had the lease lapsed first, the campaign's next job could
        # start while the lost one is still processing, and both would train from the same campaign step.
        lock = CampaignLock(self.store, job.campaign_id, holder=f"{self.worker_name}:{job_id}",
                            lease_s=self.settings.heartbeat_stale_s
                            + max(self.settings.heartbeat_stale_s, self.settings.sweep_interval_s))
        for _ in range(PARK_TRIES):
            wait = self._wait_of(job)
            if wait is None:
                if lock.acquire():
                    break
                if job.status == JobStatus.PROCESSING:  # a second copy of a running job's message
                    return Outcome(OutcomeKind.DROPPED, f"running under {lock.holder()}")
                wait = Wait.for_campaign(job.campaign_id, _job_of_holder(lock.holder()), now=time.time())
            if self.store.park(job.id, wait):  # clears the unpublished mark with the wait
                logger.info("job %s: waiting, %s", job.id, wait.describe())
                return Outcome(OutcomeKind.WAITING, wait.describe(), wait=wait)
            job = self.store.get(job_id)  # its turn came while it was being parked: look again
            if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
                self.store.mark_published([job_id])
                return Outcome(OutcomeKind.DROPPED, f"job is {job.status.value}")
        else:
            return self._defer(job, republish, "its campaign changed hands while it was being parked")
        try:
            token = uuid.uuid4().hex
            claimed = self.store.claim(job_id, self.worker_name, token=token,
                                       stale_after_s=self.settings.heartbeat_stale_s,
                                       policy=RetryPolicy.for_job(job), lock_token=lock.token)
            self.store.mark_published([job_id])  # processing (a lost run is the sweep's), or not this delivery's
            if claimed is None:
                return Outcome(OutcomeKind.DROPPED, "already running elsewhere or finished")
            return self._train(claimed, token, lock, republish)
        finally:
            try:
                lock.release()
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                logger.warning("job %s: could not release the campaign lock: %s", job_id, exc)
            self._wake_campaign(job.campaign_id, republish)

    def _wait_of(self, job: Job) -> Wait | None:
        """What a queued job must wait for before it may take its campaign's lock: its retry backoff, or the job
        ahead of it in its campaign. None when it may try now (also for a processing job: a redelivery)."""
        if job.status != JobStatus.QUEUED:
            return None
        now = time.time()
        retry_at = self.store.runtime(job.id).retry_at
        if retry_at and retry_at > now:
            return Wait.for_backoff(job.campaign_id, retry_at, now=now)
        head = self.store.campaign_head(job.campaign_id)
        if head in (None, job.id):
            return None
        pending = self.store.campaign_pending(job.campaign_id)  # only a job that waits reads its campaign's backlog
        ahead = pending[:pending.index(job.id)] if job.id in pending else [head]
        return Wait.for_campaign(job.campaign_id, ahead[-1] if ahead else head, now=now)

    def _wake_campaign(self, campaign_id: str, republish: Publisher) -> None:
        """Send the message of the campaign's first queued job if it is parked and the campaign is free (the end of
        a run, a dropped message of a cancelled job). Never raises: the sweep wakes it otherwise."""
        try:
            woken = self.store.wake_head(campaign_id)
            if woken is not None:
                republish(woken, self.store.get(woken).priority, at_head=True)
                self.store.mark_published([woken])
                logger.info("campaign %s is free: woke its next job %s", campaign_id, woken)
        except Exception as exc:  # noqa: BLE001 - the sweep wakes parked jobs too
            logger.warning("campaign %s: could not wake its next job (the sweep will): %s", campaign_id, exc)

    def _defer(self, job: Job, republish: Publisher, why: str, delay_s: float = DEFAULT_DEFER_DELAY_S) -> Outcome:
        """The last resort when parking keeps failing: back to its queue after a short pause."""
        self._resend(job, republish, before=lambda: time.sleep(max(delay_s, 0.0)))
        return Outcome(OutcomeKind.DEFERRED, why)

    def _resend(self, job: Job, republish: Publisher, before=None, at_head: bool = False) -> None:
        """Run ``before`` (a pause, the transition back to queued), then send the job's message again.

        The delivery being handled is acked when the task ends, even when it fails: from here until the new message
        is out, the job has none. It is marked unpublished first (again, for a deferral), so if the send (or
        ``before``) fails, say Redis was killed meanwhile, the sweep sends it later instead of the job waiting forever
        in ``queued``.
        """
        self.store.mark_unpublished(job.id)
        if before is not None:
            before()
        republish(job.id, job.priority, at_head=at_head)
        self.store.mark_published([job.id])

    def _train(self, job: Job, token: str, lock: CampaignLock, republish: Publisher) -> Outcome:
        from engine.errors import DatasetInvalid

        policy = RetryPolicy.for_job(job)
        if job.plan is None:
            return self._fail(job, token, "the job has no plan (enqueued by an older Guild); enqueue its file again")
        if not policy.may_start(job.attempts):
            return self._fail(job, token, f"gave up after {job.attempts - 1} attempts (queue.max_attempts); "
                                          f"last error: {job.last_error}")
        beat = _Beat(self.store, job.id, token, lock, self.beat_s, self.heartbeat_s)
        beat.start()
        try:
            prep = self._prepare(job)
            self._check_memory(job, prep)  # a job that cannot fit the worker's GPUs fails before anything loads
            # Bounded disk: a job that could not write its checkpoints fails now, with what it needs and the fix.
            ensure_checkpoint_space(prep.checkpoint_dir, prep.campaign, prep.model_path,
                                    job.plan.config.hyperparams.save_total_limit)
            # The campaign's eval set: the current one at the job's first start, then always that one.
            evaluation = job_evaluation(job, prep.campaign, prep.resume.path, prep.resume.step, prep.checkpoint_dir)
            self.store.update(job.id, owner=token, start_step=prep.resume.step,
                              metadata={**job.metadata,
                                        "resume_from": str(prep.resume.path) if prep.resume.path else None,
                                        EVAL_SET_KEY: evaluation.record})
            from tasks.tracking import CampaignTracker

            tracker = CampaignTracker(prep.checkpoint_dir.parent.parent, job.id)
            evals = EvalReporter(prep.checkpoint_dir.parent.parent, job.id, evaluation.spec, tracker)
            started = time.time()
            result = self.engine.run_job(
                job.dataset_path, job.plan.config, self._progress_callback(job, beat, tracker, evals),
                beat.should_stop, model_path=prep.model_path, checkpoint_dir=prep.checkpoint_dir,
                resume_from=prep.resume.path, run_id=job.id, enable_packing=self.settings.enable_packing,
                chat=job.plan.hero.chat_options, evaluation=evaluation.spec, on_eval=evals.on_eval)
            logger.info("job %s: engine returned %s after %.1f s", job.id, result.status, time.time() - started)
            return self._finish(job, token, prep, tracker, result, beat, lock, republish)
        except NotOwner as exc:
            return self._taken_over(job, exc)
        except DatasetInvalid as exc:
            text = str(exc)
            return self._end(job, lambda: self.store.transition(
                job.id, JobStatus.SKIPPED, owner=token, reason="data invalid at train time",
                fields={"last_error": text, "finished_at": utc_now(), "progress": None}),
                Outcome(OutcomeKind.SKIPPED, text))
        except GuildError as exc:
            return self._fail(job, token, str(exc))
        except Exception as exc:  # noqa: BLE001 - any crash of the engine becomes the job's error, with traceback
            text = f"{type(exc).__name__}: {exc}"
            logger.exception("job %s crashed", job.id)
            decision = policy.after_failure(exc, job.attempts)
            if decision.action is Action.RETRY:
                return self._retry_later(job, token, text, decision.delay_s, republish)
            if decision.reason:
                text = f"{text} ({decision.reason})"
            return self._fail(job, token, text, traceback.format_exc(), replace_worker=decision.replace_worker)
        finally:
            beat.stop()

    def _progress_callback(self, job: Job, beat: _Beat, tracker, evals: EvalReporter | None = None):
        """``on_progress`` for the engine: memory only, never raises into training. The latest evaluation
        (``evals.latest``: eval_step, eval_loss, sample) rides along with every progress report."""
        state = {"started": False, "warned": False}

        def on_progress(step, total_steps, loss, lr, tokens_per_sec, eta_s):
            try:
                if not state["started"]:
                    # Only once training runs: by then the model and tokenizer modules are imported, and
                    # transformers' lazy imports are not thread-safe.
                    state["started"] = True
                    self._prepare_next_in_background(job)
                beat.progress = {"step": step, "total_steps": total_steps, "loss": loss, "lr": lr,
                                 "tokens_per_sec": tokens_per_sec, "eta_s": eta_s, "updated_at": time.time(),
                                 **(evals.latest if evals is not None else {})}
                ranks = self.engine.live_ranks()
                if ranks is not None:  # a multi-rank worker: its rank processes alive (all, while it trains)
                    beat.progress.update(ranks=ranks, ranks_expected=self.settings.ranks)
                tracker.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_sec": tokens_per_sec}, step)
                if self._emit is not None:
                    self._emit(beat.progress)
            except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
                if not state["warned"]:
                    state["warned"] = True
                    logger.warning("job %s: progress not recorded: %s", job.id, exc)

        return on_progress

    # ----------------------------------------------------------------------------------------- preparation

    def _prepare(self, job: Job) -> Preparation:
        """The job's campaign, model and resume point. Its config is its plan's: nothing is resolved again."""
        campaign = self.campaigns.get(job.campaign_id)
        job.plan.check_locked(campaign.id, campaign.locked)  # campaign.json edited since enqueue
        model_path = self.engine.materialise(job.plan.hero, self.settings.guild_home)
        checkpoint_dir = self.campaigns.checkpoint_root(campaign) / job.id
        resume = self.engine.resume_point(checkpoint_dir, campaign.latest_checkpoint)
        return Preparation(campaign, model_path, checkpoint_dir, resume)

    def _check_memory(self, job: Job, prep: Preparation) -> None:
        """Refuse a job whose memory estimate exceeds the worker's GPUs (``heroes.memory.check_fits``).

        A CPU worker, an engine that trains on no GPU, or a model whose shape is unknown is not checked (the estimate
        is of GPU memory; a CPU worker's RAM is shared with everything else on the host and swaps rather than fails).

        Raises:
            WontFit: with the estimate and the changes that would fit.
        """
        from heroes.memory import check_fits, shape_of

        shape = shape_of(job.plan.hero, prep.model_path)
        gpu_bytes = self.engine.device_memory()
        if shape is None or gpu_bytes is None:
            return
        ranks = self.settings.ranks
        estimate = check_fits(shape, job.plan.config, gpu_bytes, ranks)  # DDP or FSDP as hyperparams.sharding says
        logger.info("job %s: needs ~%s per GPU of %.1f GiB (%d rank(s))", job.id, estimate.describe(),
                    gpu_bytes / 2**30, ranks)

    def _prepare_next_in_background(self, job: Job) -> None:
        """Tokenise and pack the campaign's next queued job while this one trains, so the next starts at once.

        The next job of a campaign usually lands on this worker (it holds the warm model); if it lands
        elsewhere, the work here was only wasted, never wrong.
        """

        def prepare() -> None:
            try:
                upcoming = [i for i in self.store.campaign_pending(job.campaign_id) if i != job.id]
                if not upcoming:
                    return
                nxt = self.store.get(upcoming[0])
                if nxt.status != JobStatus.QUEUED or nxt.plan is None:
                    return
                model_path = self.engine.materialise(nxt.plan.hero, self.settings.guild_home)
                self.engine.prepare(nxt.dataset_path, nxt.plan.config, model_path=model_path,
                                    enable_packing=self.settings.enable_packing, chat=nxt.plan.hero.chat_options)
                logger.info("job %s: data of the next job %s prepared", job.id, nxt.id)
            except Exception as exc:  # noqa: BLE001 - an optimisation only; the job prepares its own data
                logger.info("job %s: next job not prepared ahead: %s", job.id, exc)

        threading.Thread(target=prepare, daemon=True, name=f"prepare-after-{job.id}").start()

    # ------------------------------------------------------------------------------------------- endings

    def _finish(self, job: Job, token: str, prep: Preparation, tracker, result, beat: _Beat, lock: CampaignLock,
                republish: Publisher) -> Outcome:
        for step, val_loss in result.val_history:
            tracker.log({"val/loss": val_loss}, step)
        tracker.close()
        status = TrainingStatus(result.status)
        if beat.stop_reason is StopReason.TAKEN_OVER:
            return self._taken_over(job, "taken over while it ran")
        artifacts = self._write_plots(job, prep, result)
        fields = {"final_step": result.final_step, "final_loss": result.final_loss,
                  "final_val_loss": result.final_val_loss, "trained_tokens": result.trained_tokens,
                  "tokens_per_sec": result.tokens_per_sec, "start_step": result.start_step,
                  "final_eval_loss": result.final_eval_loss, "train_s": result.train_s, "eval_s": result.eval_s,
                  "finished_at": utc_now(), "progress": None, "artifacts": artifacts,
                  "metadata": {**self.store.get(job.id).metadata, "checkpoint": result.checkpoint_path,
                               "num_truncated": result.num_truncated, "num_dropped": result.num_dropped,
                               "num_train_examples": result.num_train_examples,
                               "num_val_examples": result.num_val_examples,
                               "attention": result.attention, "loss_kernel": result.loss_kernel,
                               "engine_warnings": list(result.warnings),
                               "loss_history": result.loss_history[-2000:], "val_history": result.val_history,
                               "eval_history": [p.to_dict(answers=False) for p in result.eval_history]}}
        if status is TrainingStatus.COMPLETED:
            return self._complete(job, token, result, fields, lock, republish)
        if status is TrainingStatus.STOPPED:
            reason = beat.stop_reason
            if reason is StopReason.CANCEL:
                return self._end(job, lambda: self.store.transition(
                    job.id, JobStatus.CANCELLED, owner=token, reason="cancelled while running", fields=fields),
                    Outcome(OutcomeKind.CANCELLED))
            # Paused, preempted, or the campaign lock lost: back to the head of its queue, resuming from the
            # checkpoint just written. It did not fail, so this attempt does not count against queue.max_attempts.
            return self._step_aside(job, token, fields, f"stopped ({reason}); resumes from step {result.final_step}",
                                    republish)
        return self._fail(job, token, result.error or "training failed", fields=fields)

    def _complete(self, job: Job, token: str, result, fields: dict, lock: CampaignLock,
                  republish: Publisher) -> Outcome:
        """Advance the campaign, then mark the job completed, both only while this run still owns them.

        The campaign record is written under the campaign lock, renewed just before: no other worker can hold the
        campaign for a whole lease after that, so a run that lost its lock (it stalled past the lease) never moves
        the campaign under a new owner's feet.
        """
        current, runtime = self.store.get(job.id), self.store.runtime(job.id)
        if current.status != JobStatus.PROCESSING or runtime.claim != token:
            return self._taken_over(job, f"now {current.status.value} under {runtime.worker}")
        if not lock.renew() and not lock.acquire():
            logger.error("job %s: trained, but the campaign lock is held by %s; not touching the campaign",
                         job.id, lock.holder())
            fields = {**fields, "finished_at": None}
            return self._step_aside(job, token, fields, "campaign lock lost before the campaign was advanced; "
                                    f"resumes from its final checkpoint (step {result.final_step})", republish)
        with self.campaigns.edit(job.campaign_id) as campaign:
            campaign.current_step = result.final_step
            campaign.latest_checkpoint = result.checkpoint_path
            campaign.config_hash = job.plan.config_hash
            campaign.code_version = git_commit()
            if job.id not in campaign.job_ids:
                campaign.job_ids.append(job.id)
        outcome = self._end(job, lambda: self.store.transition(job.id, JobStatus.COMPLETED, owner=token,
                                                               reason="trained", fields=fields),
                            Outcome(OutcomeKind.COMPLETED))
        if outcome.action is OutcomeKind.COMPLETED:
            self._apply_retention(job)
        return outcome

    def _apply_retention(self, job: Job) -> None:
        """Bounded disk: the campaign's checkpoint policy, now that this job's final checkpoint is the latest.
        Runs while the job still holds its campaign lock; pruning never fails a trained job."""
        try:
            report = apply_retention(self.campaigns, job.campaign_id, self.store)
            for error in report.errors:
                logger.warning("job %s: checkpoint retention: %s", job.id, error)
        except Exception as exc:  # noqa: BLE001
            logger.warning("job %s: checkpoint retention failed: %s", job.id, exc)

    def _step_aside(self, job: Job, token: str, fields: dict, reason: str, republish: Publisher) -> Outcome:
        fields = {**fields, "finished_at": None}

        def requeue():
            self._resend(job, republish, at_head=True, before=lambda: self.store.transition(
                job.id, JobStatus.QUEUED, owner=token, reason=reason, fields=fields,
                update=lambda j: {"attempts": max(j.attempts - 1, 0)}))

        return self._end(job, requeue, Outcome(OutcomeKind.REQUEUED, reason))

    def _write_plots(self, job: Job, prep: Preparation, result) -> dict[str, str]:
        """The job's loss curve as a PNG beside the campaign's checkpoints."""
        try:
            from jobs.plots import write_loss_plot

            path = prep.checkpoint_dir.parent.parent / "plots" / f"{prep.checkpoint_dir.name}.png"
            write_loss_plot(path, result.loss_history, result.val_history, title=f"{job.id} ({job.campaign_id})")
            return {"loss_plot": str(path)}
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a trained job
            logger.warning("job %s: no loss plot: %s", job.id, exc)
            return {}

    def _retry_later(self, job: Job, token: str, text: str, delay_s: float, republish: Publisher) -> Outcome:
        """Requeue after a transient failure, not to start before ``delay_s`` (the policy's backoff)."""

        def requeue():
            self._resend(job, republish, before=lambda: self.store.transition(
                job.id, JobStatus.QUEUED, owner=token,
                reason=f"attempt {job.attempts} failed ({text[:300]}); retry in {delay_s:.0f} s",
                fields={"last_error": text, "progress": None, "retry_at": time.time() + delay_s}))

        return self._end(job, requeue, Outcome(OutcomeKind.REQUEUED, f"transient: {text}"))

    def _fail(self, job: Job, token: str, text: str, tb: str | None = None, fields: dict | None = None,
              replace_worker: bool = False) -> Outcome:
        fields = dict(fields or {})
        fields.update({"last_error": text, "finished_at": utc_now(), "progress": None})
        if tb:
            meta = fields.get("metadata") or self.store.get(job.id).metadata
            fields["metadata"] = {**meta, "traceback": tb[-8000:]}
        outcome = self._end(job, lambda: self.store.transition(job.id, JobStatus.FAILED, owner=token,
                                                               reason=text[:500], fields=fields),
                            Outcome(OutcomeKind.FAILED, text))
        # Whoever owns the job now, this process's CUDA context stays unusable: it must go either way.
        return dataclasses.replace(outcome, replace_worker=replace_worker)

    def _end(self, job: Job, write, outcome: Outcome) -> Outcome:
        """Record an ending; a run that no longer owns its job records nothing (the new owner's results stand)."""
        try:
            write()
        except NotOwner as exc:
            return self._taken_over(job, exc)
        return outcome

    def _taken_over(self, job: Job, why) -> Outcome:
        logger.error("job %s: this run lost the job (%s); its results are dropped, the campaign is untouched",
                     job.id, why)
        return Outcome(OutcomeKind.DROPPED, "taken over while stalled")
