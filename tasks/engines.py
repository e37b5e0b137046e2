"""The training engine as a worker sees it, and how a worker picks one.

:class:`Engine` is everything :class:`tasks.lifecycle.JobRunner` asks of training: make the hero's model
loadable, find where a job resumes, prepare data ahead, and train. :class:`TorchEngine` is the real one (the
``engine`` package, imported only when the first job starts, in the worker's child process). On a worker with
several ranks (``Settings.ranks``: the GPUs it owns, or ``GUILD_RANKS`` CPU ranks) it trains each job on a warm
gang of rank processes (:class:`engine.ranks.GangTrainer`), which the worker's process starts and supervises.
A worker builds the engine named by ``GUILD_ENGINE_FACTORY=module:callable`` (called with the Settings) instead:
:class:`StandInEngine` sleeps through its steps and writes small JSON checkpoints, so the queue (real Celery,
Redis, store and lifecycle) can be tested and benchmarked with many workers and no torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

from config.errors import SettingsError
from config.schema import TrainerConfig
from engine.result import TrainingResult, TrainingStatus
from heroes.profile import Hero

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float | None, float | None, float | None, float | None], None]


class ResumePoint(NamedTuple):
    """Where a job resumes: a checkpoint (None: from the hero's weights) and its global step."""

    path: Path | None
    step: int


class Engine(Protocol):
    def materialise(self, hero: Hero, guild_home: Path) -> str:
        """A path (or hub name) the model loads from offline; builds or finds the weights. Raises HeroError."""

    def resume_point(self, own_dir: Path, campaign_latest: str | None) -> ResumePoint:
        """The job's own newest complete checkpoint in ``own_dir``, else the campaign's latest, else nothing."""

    def prepare(self, dataset_path: str, config: TrainerConfig, *, model_path: str,
                enable_packing: bool | None, chat=None) -> None:
        """Tokenise and pack a job's data ahead of its run (an optimisation; may do nothing)."""

    def run_job(self, dataset_path: str, config: TrainerConfig, on_progress: ProgressCallback,
                should_stop: Callable[[], bool], *, model_path: str, checkpoint_dir: Path,
                resume_from: Path | None, run_id: str, enable_packing: bool | None, chat=None,
                evaluation=None, on_eval=None) -> TrainingResult:
        """Train one job (see :meth:`engine.trainer.TrainerEngine.run_job`); ``evaluation`` is the campaign's eval set
        (:class:`engine.eval_plan.EvalSpec`), ``on_eval`` gets each of its evaluations."""

    def device_memory(self) -> int | None:
        """Bytes of one of the GPUs a job trains on (the smallest), or None (a CPU worker: no memory check)."""

    def live_ranks(self) -> int | None:
        """Rank processes alive now on a multi-rank worker; None on a one-process worker."""


class TorchEngine:
    """The real engine: :class:`engine.trainer.TrainerEngine`, kept warm across jobs (its model stays loaded); on a
    multi-rank worker, :class:`engine.ranks.GangTrainer` (its ranks, and their models, stay warm)."""

    def __init__(self, settings=None, verbose: bool | None = None):
        self.verbose = bool(getattr(settings, "verbose", False)) if verbose is None else verbose
        self.ranks = int(getattr(settings, "ranks", 1) or 1)
        self.rank_device = getattr(settings, "rank_device", "cpu")
        self.gang_timeout_s = float(getattr(settings, "gang_timeout_s", 300.0))
        self.cuda_visible_devices = getattr(settings, "cuda_visible_devices", None)
        self._trainer = None

    @property
    def trainer(self):
        """:class:`engine.trainer.TrainerEngine`, or :class:`engine.ranks.GangTrainer` on several ranks."""
        if self._trainer is None:
            if self.ranks > 1:
                from engine.ranks import GangTrainer

                self._trainer = GangTrainer(self.ranks, self.rank_device, verbose=self.verbose,
                                            timeout_s=self.gang_timeout_s)
            else:
                from engine.trainer import TrainerEngine  # in the worker child only: torch stays out of the CLIs

                self._trainer = TrainerEngine(verbose=self.verbose)
        return self._trainer

    def materialise(self, hero: Hero, guild_home: Path) -> str:
        from heroes.materialise import ensure_model

        return ensure_model(hero, guild_home)

    def resume_point(self, own_dir: Path, campaign_latest: str | None) -> ResumePoint:
        from engine.checkpoint import latest_checkpoint, read_checkpoint_state

        path = latest_checkpoint(own_dir) or (Path(campaign_latest) if campaign_latest else None)
        return ResumePoint(path, read_checkpoint_state(path)["global_step"] if path else 0)

    def prepare(self, dataset_path: str, config: TrainerConfig, *, model_path: str,
                enable_packing: bool | None, chat=None) -> None:
        if self.ranks > 1:
            return  # each rank tokenises its job's data itself, at the job's start
        self.trainer.prepare(dataset_path, config, model_path=model_path, enable_packing=enable_packing, chat=chat)

    def run_job(self, dataset_path, config, on_progress, should_stop, *, model_path, checkpoint_dir, resume_from,
                run_id, enable_packing, chat=None, evaluation=None, on_eval=None) -> TrainingResult:
        return self.trainer.run_job(dataset_path, config, on_progress, should_stop, model_path=model_path,
                                    checkpoint_dir=checkpoint_dir, resume_from=resume_from, run_id=run_id,
                                    enable_packing=enable_packing, chat=chat, evaluation=evaluation,
                                    on_eval=on_eval)

    def device_memory(self) -> int | None:
        if self.ranks > 1:
            if self.rank_device != "cuda":
                return None
            # Asked of nvidia-smi: this process must not create a CUDA context on a GPU its ranks use.
            from tasks.device_check import gpu_memory_of

            return gpu_memory_of(self.cuda_visible_devices)
        from heroes.memory import gpu_memory_bytes

        return gpu_memory_bytes()

    def live_ranks(self) -> int | None:
        return self.trainer.live_ranks() if self.ranks > 1 else None


STANDIN_STATE = "standin_state.json"
STANDIN_MARKER = "COMPLETE"


class StandInEngine:
    """Trains nothing: sleeps ``step_s`` per step through ``hyperparams.max_steps`` steps (10 when 0), reports
    progress after each, honours ``should_stop``, and writes a small JSON checkpoint every ``save_steps`` and at
    the end, so resuming, pausing and recovery behave as with the real engine. Imports no torch.

    Args:
        settings: the worker's Settings (unused; the factory signature).
        step_s: seconds per step.
    """

    DEFAULT_STEPS = 10

    def __init__(self, settings=None, step_s: float = 0.05):
        self.step_s = step_s

    def materialise(self, hero: Hero, guild_home: Path) -> str:
        return hero.model_path(guild_home)

    def resume_point(self, own_dir: Path, campaign_latest: str | None) -> ResumePoint:
        own = _latest_standin(own_dir)
        path = own or (Path(campaign_latest) if campaign_latest else None)
        if path is None:
            return ResumePoint(None, 0)
        return ResumePoint(path, int(json.loads((path / STANDIN_STATE).read_text())["global_step"]))

    def prepare(self, dataset_path: str, config: TrainerConfig, *, model_path: str,
                enable_packing: bool | None, chat=None) -> None:
        return None

    def device_memory(self) -> int | None:
        return None

    def live_ranks(self) -> int | None:
        return None

    def run_job(self, dataset_path, config, on_progress, should_stop, *, model_path, checkpoint_dir, resume_from,
                run_id, enable_packing, chat=None, evaluation=None, on_eval=None) -> TrainingResult:
        hp = config.hyperparams
        steps = hp.max_steps or self.DEFAULT_STEPS
        state = json.loads((Path(resume_from) / STANDIN_STATE).read_text()) if resume_from else {}
        start = int(state.get("global_step", 0))
        own = state.get("run_id") == run_id
        total = int(state["total_steps"]) if own else start + steps
        examples = _count_lines(dataset_path)
        checkpoint, history, step = (str(resume_from) if resume_from else None), [], start
        began = time.monotonic()
        status = TrainingStatus.COMPLETED
        while step < total:
            if should_stop():
                status = TrainingStatus.STOPPED
                break
            time.sleep(self.step_s)
            step += 1
            loss = 2.0 / (1.0 + 0.1 * step)
            history.append((step, loss))
            logger.info("stand-in %s: step %d/%d at %.3f", run_id, step, total, time.time())
            if step % max(hp.save_steps, 1) == 0 or step == total:
                checkpoint = _save_standin(Path(checkpoint_dir), run_id, step, total)
            on_progress(step, total, loss, hp.learning_rate, 1000.0, (total - step) * self.step_s)
        if status is TrainingStatus.STOPPED and (checkpoint is None or not checkpoint.endswith(f"{step:05d}")):
            checkpoint = _save_standin(Path(checkpoint_dir), run_id, step, total)
        elapsed = max(time.monotonic() - began, 1e-9)
        return TrainingResult(status=status.value, start_step=start, final_step=step, total_steps=total,
                              final_loss=history[-1][1] if history else None, final_val_loss=None,
                              trained_tokens=1000 * (step - start), tokens_per_sec=1000 * (step - start) / elapsed,
                              num_examples=examples, num_train_examples=examples, num_val_examples=0,
                              num_truncated=0, num_dropped=0, checkpoint_path=checkpoint, loss_history=history)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _latest_standin(own_dir: Path) -> Path | None:
    try:
        found = sorted(p for p in Path(own_dir).glob("step-*") if (p / STANDIN_MARKER).exists())
    except OSError:
        return None
    return found[-1] if found else None


def _save_standin(checkpoint_dir: Path, run_id: str, step: int, total: int) -> str:
    path = checkpoint_dir / f"step-{step:05d}"
    tmp = checkpoint_dir / f".tmp-step-{step:05d}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / STANDIN_STATE).write_text(json.dumps({"global_step": step, "total_steps": total, "run_id": run_id}))
    (tmp / STANDIN_MARKER).write_text("")
    if path.exists():  # the same step again (a resumed job that stops at once): keep the first
        shutil.rmtree(tmp, ignore_errors=True)
        return str(path)
    os.replace(tmp, path)
    return str(path)


def load_engine(settings) -> Engine:
    """The engine a worker process trains with: ``settings.engine_factory`` (``module:callable``, called with
    the settings), else :class:`TorchEngine`.

    Raises:
        SettingsError: the factory cannot be imported or called.
    """
    spec = getattr(settings, "engine_factory", None)
    if not spec:
        return TorchEngine(settings)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SettingsError(f"GUILD_ENGINE_FACTORY={spec!r}: expected module:callable, e.g. "
                            "tasks.engines:StandInEngine")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SettingsError(f"GUILD_ENGINE_FACTORY={spec!r}: cannot import it ({exc})") from None
    logger.warning("training with the engine from GUILD_ENGINE_FACTORY=%s", spec)
    return factory(settings)
