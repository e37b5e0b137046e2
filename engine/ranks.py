"""One job trained on the N ranks of a gang: the parent's side (:class:`GangTrainer`, what a multi-GPU worker
trains with) and each rank's (:func:`train_rank`).

    trainer = GangTrainer(ranks=2, device_type="cpu")   # or "cuda": rank r on cuda:r of the visible GPUs
    result = trainer.run_job(dataset, config, on_progress, should_stop, model_path=..., checkpoint_dir=..., ...)

``run_job`` has :meth:`engine.trainer.TrainerEngine.run_job`'s contract. Every rank runs ``TrainerEngine.run_job``
with the same arguments and its :class:`engine.data_parallel.World`; rank 0's progress reaches ``on_progress``,
``should_stop`` reaches every rank (which agree on the step to stop at), rank 0's result comes back.

**Warm ranks.** The gang is started on the first job and kept: each rank keeps its ``TrainerEngine`` (its model,
optimizer, DDP/FSDP wrapper and process group) between jobs, so the next job of a campaign, resuming from the
checkpoint the ranks just wrote, starts without spawning, importing or loading anything (``bench/gang_gap.py``).
A failed gang is gone (every rank stopped and reaped, :mod:`engine.gang`); the next job starts a fresh one.

**Errors.** A rank that dies, hangs or fails in a collective fails the job with :class:`engine.gang.GangFailed`
(transient: the job layer retries it from its last checkpoint). An error of the engine's own (bad data, a config
that cannot run, a broken checkpoint: every rank raises it alike) is raised as itself, so the job is skipped or
failed exactly as on one process.

**Evaluation.** A campaign's eval set (``evaluation``) is evaluated by every rank alike, at the same steps (FSDP's
forwards are collective, so no rank may skip them): the same loss and probe answers on each; rank 0's points reach
``on_eval`` through the gang's report channel, beside its progress.

**Heartbeats.** Each rank reports every optimizer step. Before its first step (loading, tokenising) and while
rank 0 writes a checkpoint a rank beats from a thread; a rank stuck there is caught by its peers' collective
timeout instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.batching import for_ranks
from config.errors import GuildError
from config.schema import TrainerConfig
from engine.chat_turns import ChatOptions
from engine.eval_plan import EvalSpec
from engine.gang import Gang, GangConfig, GangFailed
from engine.result import TrainingResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RankJob:
    """What every rank trains: the arguments of ``TrainerEngine.run_job`` (picklable: it travels to the ranks)."""

    dataset: Any  # a .jsonl path, or a list of examples
    config: TrainerConfig
    model_path: str
    checkpoint_dir: str
    resume_from: str | None
    run_id: str
    enable_packing: bool | None
    chat: ChatOptions | None
    verbose: bool = False
    evaluation: EvalSpec | None = None  # the campaign's eval set: every rank evaluates it alike


class GangTrainer:
    """Trains jobs data-parallel on a warm gang of ``ranks`` processes.

    Args:
        ranks: processes (one per GPU on CUDA).
        device_type: "cuda" (NCCL, rank r on cuda:r) or "cpu" (gloo).
        timeout_s: a collective that waits longer, or a rank silent for longer, fails the job.
        grace_s: SIGTERM to SIGKILL when a gang is torn down.
    """

    def __init__(self, ranks: int, device_type: str = "cpu", *, verbose: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = 5.0):
        self.gang_config = GangConfig(ranks=ranks, device_type=device_type, collective_timeout_s=timeout_s,
                                      silence_timeout_s=timeout_s, startup_timeout_s=max(timeout_s,
                                                                                         STARTUP_TIMEOUT_S),
                                      grace_s=grace_s)
        self.verbose = verbose
        self._gang: Gang | None = None

    @property
    def ranks(self) -> int:
        return self.gang_config.ranks

    def live_ranks(self) -> int:
        """Rank processes alive now (0 before the first job and after a failure)."""
        return self._gang.live_ranks() if self._gang is not None else 0

    def pids(self) -> list[int]:
        return self._gang.pids() if self._gang is not None and not self._gang.closed else []

    def run_job(self, dataset, config: TrainerConfig, on_progress=None, should_stop=None, *, model_path: str,
                checkpoint_dir: Path, resume_from: Path | None = None, run_id: str = "run",
                enable_packing: bool | None = None, chat: ChatOptions | None = None,
                evaluation: EvalSpec | None = None, on_eval=None) -> TrainingResult:
        """Train one job on the gang (see the module docstring). ``on_eval(point)`` gets rank 0's evaluations of
        ``evaluation`` (every rank evaluates the whole set alike, so they are every rank's).

        Raises:
            ConfigError: the global batch does not divide over the ranks (before any rank starts).
            GangFailed: a rank died, hung or failed in a collective; the gang was torn down.
            EngineError: what ``TrainerEngine.run_job`` raises (bad data, a bad checkpoint, ...).
        """
        for_ranks(config, self.ranks)  # a width that does not divide the global batch: refused before anything
        job = RankJob(dataset=dataset if not isinstance(dataset, os.PathLike) else str(dataset), config=config,
                      model_path=str(model_path), checkpoint_dir=str(checkpoint_dir),
                      resume_from=str(resume_from) if resume_from is not None else None, run_id=run_id,
                      enable_packing=enable_packing, chat=chat, verbose=self.verbose, evaluation=evaluation)
        if self._gang is None or self._gang.closed:
            self._gang = Gang(self.gang_config)

        def progress(report: tuple) -> None:
            kind, values = report
            if kind == "progress" and on_progress is not None:
                on_progress(*values)
            elif kind == "eval" and on_eval is not None:
                on_eval(values)

        try:
            return self._gang.run(train_rank, (job,), on_progress=progress, should_stop=should_stop)
        except GangFailed as exc:
            self._gang = None
            if isinstance(exc.error, GuildError):  # the engine's own error, raised alike on every rank
                raise exc.error from exc
            raise

    def close(self) -> None:
        """Stop the warm ranks (their memory and GPUs are freed)."""
        if self._gang is not None:
            self._gang.close()
            self._gang = None


# ------------------------------------------------------------------------------------------------ a rank

_ENGINE: dict[str, Any] = {}  # this rank's TrainerEngine: its warm model stays between the jobs of a gang


def train_rank(ctx, job: RankJob) -> TrainingResult:
    """Run in every rank by :meth:`GangTrainer.run_job`: ``TrainerEngine.run_job`` as rank ``ctx.rank``."""
    from engine.data_parallel import World, agree, beating
    from engine.trainer import TrainerEngine

    engine = _ENGINE.get("engine")
    if engine is None:
        _log_to_stderr(ctx.rank, job.verbose)
        engine = _ENGINE["engine"] = TrainerEngine(verbose=job.verbose, device=str(ctx.device))
    world = World(ctx.rank, ctx.world_size, ctx.beat)
    with contextlib.ExitStack() as setup:
        setup.enter_context(beating(ctx.beat))  # until the first step: loading and tokenising say nothing

        def on_progress(*values) -> None:
            setup.close()
            ctx.report(("progress", values))

        def on_eval(point) -> None:
            ctx.report(("eval", point))  # from rank 0 only (the others' reports are heartbeats)

        def should_stop() -> bool:
            return agree(ctx.stop_requested())  # every rank stops after the same step

        return engine.run_job(job.dataset, job.config, on_progress, should_stop, model_path=job.model_path,
                              checkpoint_dir=Path(job.checkpoint_dir),
                              resume_from=Path(job.resume_from) if job.resume_from else None, run_id=job.run_id,
                              enable_packing=job.enable_packing, chat=job.chat, world=world,
                              evaluation=job.evaluation, on_eval=on_eval)


def _log_to_stderr(rank: int, verbose: bool) -> None:
    """A spawned rank starts with no logging set up: rank 0 logs like a worker (INFO), the others warnings only;
    both to stderr, which a worker's log file collects."""
    root = logging.getLogger()
    if not root.handlers:  # a handler may come with the parent's main module, re-imported by spawn
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s: %(levelname)s/rank{rank}] %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 or verbose else logging.WARNING)
