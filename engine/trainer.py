"""The training loop: :class:`TrainerEngine` runs one job (a dataset, a config) and returns a TrainingResult.

The engine knows nothing of queues. It takes a dataset, a resolved config, a progress callback and a stop check,
trains from a model directory or a checkpoint, writes checkpoints into a directory, and returns what happened.
One engine per worker process: it keeps the last model and optimizer in memory, so the next job of the same
campaign, which resumes from the checkpoint this engine just wrote, starts without reloading anything.

Given a ``world`` (one rank of a gang, :mod:`engine.ranks`), the same loop trains data-parallel: the seams are in
:mod:`engine.data_parallel` (which rows a rank takes, the loss over the global step, gradient exchange, checkpoints
written by rank 0); without one, none of it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from config.batching import for_ranks
from config.schema import TrainerConfig
from engine import determinism
from engine.adapters import load_kwargs, prepare_model, weights_source
from engine.attention import AttentionPath, choose_path, install, layout_for
from engine.batches import DataOrder, job_steps
from engine.chat_turns import ChatOptions
from engine.checkpoint import (
    checkpoint_name,
    load_optimizer_state,
    read_checkpoint_state,
    remove_stale_temp_dirs,
    restore_rng,
    save_checkpoint,
)
from engine.data_parallel import DataParallel, StepCounts, World, beating, seed_rank
from engine.dataset import PreparedDataset, prepare_dataset
from engine.errors import DatasetInvalid, ModelLoadError
from engine.eval_plan import EvalPoint, EvalSpec
from engine.evaluation import Evaluator, loss_over, rows_per_batch
from engine.formats import DatasetError, Example, read_examples
from engine.loss import choose_loss_kernel, loss_sum
from engine.model import autocast_for, build_optimizer, compile_layers, load_model, set_activation_checkpointing
from engine.packing import Batch, collate
from engine.prefetch import BatchPrefetcher
from engine.result import TrainingResult, TrainingStatus
from engine.schedule import lr_at, schedule_warnings
from engine.stepping import PendingStep, RngState, apply_update, not_finite_flag, optimizer_can_skip

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float, float, float, float], None]
EvalCallback = Callable[[EvalPoint], None]
Dataset = str | os.PathLike | Sequence[Example] | PreparedDataset

_PREPARED_CACHE_SIZE = 3  # the running job's data, the next job's, and one spare
_EVALUATOR_CACHE_SIZE = 2  # a campaign's eval set, and the one it was replaced with


class TrainerEngine:
    """Runs training jobs one after another in this process, keeping the model warm between them.

    Args:
        verbose: log every optimizer step at INFO (otherwise about every 10% of a job).
        device: "cuda", "cpu", ...; by default CUDA when available, else the CPU.
        compile: compile each decoder layer with ``torch.compile`` (rows padded to a fixed length so shapes stay
            static; the loss and the document layout stay eager). The first steps of a new model pay the compile
            time.
    """

    def __init__(self, verbose: bool = False, device: str | None = None, compile: bool = False):
        self.verbose = verbose
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compile = compile
        self._lock = threading.Lock()  # guards the caches below
        self._tokenize_lock = threading.Lock()  # a Rust tokenizer must not be driven from two threads at once
        self._tokenizers: dict[str, Any] = {}
        self._prepared: dict[tuple, Future] = {}
        self._evaluators: dict[tuple, Evaluator] = {}
        # The warm model: valid to reuse only while it equals the checkpoint named by _warm_checkpoint.
        self._model = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._model_path: str | None = None
        self._warm_checkpoint: Path | None = None
        self._loss_fn = loss_sum
        self._parallel: DataParallel | None = None  # with a world: the warm model's DDP/FSDP wrapper

    # ------------------------------------------------------------------------------------------------ data

    def prepare(
        self,
        dataset: Dataset,
        config: TrainerConfig,
        *,
        model_path: str | None = None,
        enable_packing: bool | None = None,
        chat: ChatOptions | None = None,
    ) -> PreparedDataset:
        """Read, tokenise, split and pack ``dataset`` for ``config``; cache it for :meth:`run_job`.

        Safe to call from a background thread while a job trains, to have the next job's data ready. A second call
        with the same inputs (or run_job's own) returns the cached result, waiting for it if it is being computed.

        Args:
            model_path: whose tokenizer to use; defaults to the model this engine has loaded.
            enable_packing: overrides ``config.data.enable_packing`` when not None.
            chat: the hero's chat options (``Hero.chat_options``): what becomes of empty think blocks.

        Raises:
            DatasetInvalid: the file has problems, or nothing is left to train on.
            ModelLoadError: the tokenizer cannot be loaded.
        """
        if isinstance(dataset, PreparedDataset):
            return dataset
        model_path = model_path or self._model_path
        if model_path is None:
            raise ValueError("prepare() needs model_path until a model is loaded")
        hp = config.hyperparams
        packing = config.data.enable_packing if enable_packing is None else enable_packing
        key = (
            _dataset_key(dataset),
            str(model_path),
            hp.max_length,
            packing,
            hp.eval_fraction,
            hp.eval_max_examples,
            hp.seed,
            chat,
        )
        with self._lock:
            future = self._prepared.get(key)
            owner = future is None
            if owner:
                future = self._prepared[key] = Future()
                while len(self._prepared) > _PREPARED_CACHE_SIZE:
                    self._prepared.pop(next(iter(self._prepared)))
        if not owner:
            return future.result()
        try:
            examples = _read_dataset(dataset)
            tokenizer = self._tokenizer(str(model_path))
            with self._tokenize_lock:
                prepared = prepare_dataset(
                    examples,
                    tokenizer,
                    max_length=hp.max_length,
                    packing=packing,
                    eval_fraction=hp.eval_fraction,
                    eval_max_examples=hp.eval_max_examples,
                    seed=hp.seed,
                    chat=chat,
                    source=str(dataset) if isinstance(dataset, (str, os.PathLike)) else "",
                )
        except BaseException as exc:
            with self._lock:
                self._prepared.pop(key, None)
            future.set_exception(exc)
            raise
        future.set_result(prepared)
        return prepared

    def _tokenizer(self, model_path: str):
        with self._lock:
            if model_path in self._tokenizers:
                return self._tokenizers[model_path]
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
            raise ModelLoadError(f"cannot load the tokenizer of {model_path}: {type(exc).__name__}: {exc}") from None
        with self._lock:
            return self._tokenizers.setdefault(model_path, tokenizer)

    # ------------------------------------------------------------------------------------------------- job

    def run_job(
        self,
        dataset: Dataset,
        config: TrainerConfig,
        on_progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        model_path: str,
        checkpoint_dir: Path,
        resume_from: Path | None = None,
        run_id: str = "run",
        enable_packing: bool | None = None,
        chat: ChatOptions | None = None,
        world: World | None = None,
        evaluation: EvalSpec | None = None,
        on_eval: EvalCallback | None = None,
    ) -> TrainingResult:
        """Train one job and return its result.

        Args:
            dataset: a ``.jsonl`` path, a list of :class:`engine.formats.Example`, or the output of :meth:`prepare`.
            config: the resolved config.
            on_progress: ``on_progress(step, total_steps, loss, lr, tokens_per_sec, eta_s)`` once per optimizer
                step, in order; ``step`` is the global step completed, ``total_steps`` the global step this job ends
                at. On a GPU it comes while the next step computes (reading a step's loss waits for the device).
            should_stop: polled between two optimizer steps, after the earlier one was reported; True stops the job
                after saving a checkpoint of the last step applied.
            model_path: the model directory (weights when starting fresh, and always the tokenizer).
            checkpoint_dir: where this job writes its ``step-N`` checkpoints.
            resume_from: a checkpoint. One this job wrote (same ``run_id``) resumes everything, data position
                included; another job's continues the campaign (global step, weights, optimizer, LR schedule, RNG)
                with this job's data from its start.
            run_id: the job's id, recorded in its checkpoints.
            enable_packing: the final packing switch when not None (the caller resolves ``ENABLE_PACKING``);
                otherwise ``config.data.enable_packing``.
            chat: the hero's chat options, see :meth:`prepare`.
            world: this process's rank in a data-parallel gang (:mod:`engine.ranks` runs it); every rank calls
                run_job with the same arguments. None: one process, as always.
            evaluation: a fixed eval set (a campaign's): evaluated, its probes answered, every ``eval_steps`` steps
                and at the end of a completed job (and before the first step when ``at_start``), beside the job's
                own validation split. Evaluation time is counted apart: ``tokens_per_sec`` is over training time.
                With a ``world``, every rank evaluates the whole set alike (see :meth:`_evaluate`).
            on_eval: ``on_eval(point)`` after each evaluation of ``evaluation``, in the training thread.

        Returns:
            The result; status "completed", "stopped" or "failed" (non-finite loss). ``warnings`` lists what the
            caller should show the user (an LR of 0, determinism not guaranteed).

        Raises:
            DatasetInvalid: the data cannot be trained on (the caller skips the job).
            ModelLoadError: the model or tokenizer cannot be loaded.
            CheckpointError: ``resume_from`` is not a complete, readable checkpoint.
            EvalSetInvalid, EvalSetTooLarge: ``evaluation`` cannot be evaluated here, or is over its token budget.
            AttentionConfigError: the attention or loss configuration cannot run here, or would let packed
                examples see each other.
        """
        entered = time.perf_counter()
        ranks = world.size if world is not None else 1
        given = config  # what checkpoints record: the job's config, the same at any width
        config = for_ranks(config, ranks)  # config.batching: a global batch becomes this rank's accumulation
        hp = config.hyperparams
        checkpoint_dir = Path(checkpoint_dir)

        # ---- data: prepared ahead by prepare(), or now --------------------------------------------------------
        data = self.prepare(dataset, config, model_path=model_path, enable_packing=enable_packing, chat=chat)
        evaluator = self._evaluator(evaluation, str(model_path), chat) if evaluation is not None else None
        order = DataOrder(len(data.rows), hp.batch_size, hp.seed, shuffle=config.data.shuffle)
        ga = hp.gradient_accumulation_steps  # micro-batches of one step on this rank
        step_micro = ga * ranks  # ... and over all ranks: what a step consumes, whatever the width
        first_micro = world.rank * ga if world is not None else 0
        counts = StepCounts(data.rows, data.train) if world is not None else None
        step_counts: dict[int, tuple[int, int]] = {}  # job step -> (tokens, loss tokens) over all ranks

        # ---- where this job starts: a fresh campaign, a campaign continued, or this job resumed ----------------
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if world is None or world.is_main:
            remove_stale_temp_dirs(checkpoint_dir)
        resumed = read_checkpoint_state(resume_from) if resume_from is not None else None
        global_step = resumed["global_step"] if resumed else 0
        job_step, job_start, loss_history, val_history = 0, global_step, [], []
        eval_history: list[EvalPoint] = []
        own_resume = False
        if resumed and resumed.get("run_id") == run_id:
            if resumed.get("position", {}).get("data_fingerprint") == data.fingerprint:
                # The same job after a crash or a stop: continue its data where it was.
                own_resume = True
                job_step, job_start = resumed["job_step"], resumed["job_start_step"]
                loss_history = [tuple(p) for p in resumed.get("loss_history", [])]
                val_history = [tuple(p) for p in resumed.get("val_history", [])]
                eval_history = [EvalPoint.from_dict(p) for p in resumed.get("eval_history", [])]
            else:
                logger.warning(
                    "run %s resumes from %s but its data changed; its data starts again from the beginning",
                    run_id,
                    resume_from,
                )
        end_step = job_start + job_steps(order, hp, step_micro)
        warnings = schedule_warnings(hp, global_step, end_step)
        warnings += determinism.configure(hp.deterministic, self.device)

        # ---- model, optimizer, attention and loss kernels: warm from the last job, or loaded -------------------
        model, optimizer = self._load(model_path, resume_from, config, world)
        tokenizer = self._tokenizer(str(model_path))
        path = choose_path(
            hp.attention,
            self.device,
            compiled=self.compile,
            deterministic=hp.deterministic,
            attention_dropout=float(getattr(model.config, "attention_dropout", 0.0) or 0.0),
        )
        if not install(model, packed=data.packed):
            path = None  # the model's own attention, on unpacked rows
        if self.compile and path is AttentionPath.PER_DOCUMENT:
            warnings.append(
                "hyperparams.attention=per_document slices rows at each example's length, so compiled layers "
                "recompile for new lengths; with TrainerEngine(compile=True) use hyperparams.attention=auto"
            )
        kernel = choose_loss_kernel(hp.loss_kernel, self.device)
        logger.info(
            "run %s: steps %d -> %d (job step %d), %d train rows, %d val examples, attention %s, cross-entropy %s, "
            "resume from %s",
            run_id,
            global_step,
            end_step,
            job_step,
            len(data.rows),
            len(data.val),
            path.value if path else "model's own",
            kernel.value,
            resume_from,
        )
        for text in warnings:
            logger.warning("run %s: %s", run_id, text)
        if resume_from is not None:
            restore_rng(resume_from)
        else:
            torch.manual_seed(hp.seed)
            random.seed(hp.seed)
        if world is not None:
            seed_rank(world, hp.seed, global_step)
        autocast = autocast_for(self.device, hp.precision)
        # Static shapes (full rows, batch_size of them) for compiled code: it then compiles once.
        static = self.compile or path is AttentionPath.FLEX
        fixed_length, fixed_rows = (data.row_length, hp.batch_size) if static else (None, None)
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = hp.max_grad_norm if hp.max_grad_norm > 0 else math.inf
        defer = optimizer_can_skip(optimizer)

        def checkpoint_state() -> dict[str, Any]:
            return {
                "global_step": global_step,
                "run_id": run_id,
                "job_step": job_step,
                "job_start_step": job_start,
                "job_total_steps": end_step - job_start,
                "epoch": order.epoch_of(job_step * step_micro),
                "position": {"micro_batch": job_step * step_micro, "data_fingerprint": data.fingerprint},
                # The LR is a function of the global step: these say which, and the last value used.
                "scheduler": {
                    "name": hp.lr_scheduler,
                    "learning_rate": hp.learning_rate,
                    "warmup_steps": hp.warmup_steps,
                    "decay_steps": hp.decay_steps,
                    "last_lr": lr_at(global_step - 1, hp) if global_step > 0 else None,
                },
                "config_hash": given.config_hash(),
                "config": given.to_dict(),
                "model_path": str(model_path),
                "loss_history": loss_history,
                "val_history": val_history,
                "eval_history": [p.to_dict(answers=False) for p in eval_history],
                "saved_at": time.time(),
            }

        def save() -> Path:
            def write(**gathered) -> Path:
                return save_checkpoint(checkpoint_dir, global_step, model, optimizer, tokenizer, checkpoint_state(),
                                       hp.save_total_limit, **gathered)

            if self._parallel is None:
                path_ = write()
            else:  # rank 0 writes (the full state, gathered under FSDP), the others wait for it
                path_ = self._parallel.save(write, checkpoint_dir / checkpoint_name(global_step), optimizer)
            self._warm_checkpoint = path_
            return path_

        def validate() -> float:
            return self._evaluate(model, data, hp.batch_size, autocast, path, static)

        # ---- evaluation: the job's own validation split and the campaign's fixed set, timed apart -------------
        eval_cost = {"in_loop_s": 0.0, "total_s": 0.0, "count": 0}
        if evaluator is not None:
            eval_rows = rows_per_batch(hp.batch_size, data.row_length, evaluator.data.row_length)
            eval_shape = (evaluator.data.row_length, eval_rows) if static else (None, None)

            def eval_batch(rows, examples) -> Batch:
                return self._batch(rows, examples, range(len(rows)), evaluator.data.pad_id, path, *eval_shape)

        def run_evaluations(step: int, job_split: bool, in_loop: bool) -> float | None:
            """Validate on the job's split (``job_split``) and evaluate the campaign's set; the split's loss."""
            # A rank beats meanwhile: an evaluation is no step, and the gang's watchdog wants a word per step.
            with beating(world.beat) if world is not None else contextlib.nullcontext():
                return evaluate_now(step, job_split, in_loop)

        def evaluate_now(step: int, job_split: bool, in_loop: bool) -> float | None:
            started = time.perf_counter()
            val_loss = None
            if job_split and data.val:
                val_loss = validate()
            if evaluator is not None:
                # With a world every rank evaluates the whole set alike (the loss through the DDP/FSDP wrapper, the
                # probes on the full weights): the same point on every rank; rank 0's is the one reported.
                point = evaluator.evaluate(model, step, make_batch=eval_batch, per_batch=eval_rows,
                                           device=self.device, autocast=autocast, loss_fn=self._loss_fn,
                                           full_weights=self._parallel.full_weights if self._parallel else None)
                eval_history.append(point)
                logger.info("run %s step %d eval loss %.4f (%d examples, %d loss tokens, %.2f s)", run_id, step,
                            point.loss, point.num_examples, point.num_loss_tokens, point.seconds)
                if on_eval is not None:
                    on_eval(point)
            spent = time.perf_counter() - started
            eval_cost["total_s"] += spent
            eval_cost["count"] += 1
            if in_loop:
                eval_cost["in_loop_s"] += spent
            return val_loss

        def evaluations_left(after_step: int) -> int:
            if evaluator is None and not data.val:
                return 0
            periodic = 0 if hp.eval_steps <= 0 else (end_step - 1) // hp.eval_steps - after_step // hp.eval_steps
            return max(periodic, 0) + 1

        def build(step: int) -> list[Batch]:
            """This rank's micro-batches of job step ``step`` (runs on the prefetch thread)."""
            if counts is not None:  # the whole step's tokens, over all ranks: the loss is weighted by them
                step_counts[step] = counts.of([r for j in range(step_micro)
                                               for r in order.micro_batch(step * step_micro + j)])
            return [
                self._batch(
                    data.rows, data.train, order.micro_batch(step * step_micro + first_micro + a), data.pad_id, path,
                    fixed_length, fixed_rows,
                )
                for a in range(ga)
            ]

        last_checkpoint = Path(resume_from) if resume_from is not None else None
        start_step = global_step
        status, error = TrainingStatus.COMPLETED, None
        trained_tokens = 0
        log_every = 1 if self.verbose else max(1, (end_step - global_step) // 10)
        pending: PendingStep | None = None
        prefetch = BatchPrefetcher(build, job_step, job_step + end_step - global_step, pin=self.device.type == "cuda")

        def report(done: PendingStep) -> bool:
            """Read a step's loss back; record and report it. False when it was not finite (then it was skipped
            on the device, or never applied)."""
            nonlocal trained_tokens, status, error
            loss_value, norm_value = done.read()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                status = TrainingStatus.FAILED
                error = (
                    f"non-finite loss at step {done.step} (loss {loss_value}, gradient norm {norm_value}); the step "
                    f"was not applied nor saved. Last good checkpoint: {last_checkpoint}. Lower "
                    "hyperparams.learning_rate or check the data"
                )
                logger.error("run %s: %s", run_id, error)
                return False
            trained_tokens += done.num_tokens
            loss_history.append((done.step, loss_value))
            # Training time only: evaluations inside the loop are timed apart (eval_cost) and left out.
            elapsed = done.applied_at - loop_start - eval_cost["in_loop_s"]
            tokens_per_sec = trained_tokens / elapsed if elapsed > 0 else 0.0
            eta_s = (end_step - done.step) * elapsed / (done.step - start_step)
            if eval_cost["count"]:
                eta_s += evaluations_left(done.step) * eval_cost["total_s"] / eval_cost["count"]
            if on_progress is not None:
                on_progress(done.step, end_step, loss_value, done.lr, tokens_per_sec, eta_s)
            if done.step % log_every == 0 or done.step == end_step:
                logger.info(
                    "run %s step %d/%d loss %.4f lr %.3g %.0f tok/s eta %.0fs",
                    run_id,
                    done.step,
                    end_step,
                    loss_value,
                    done.lr,
                    tokens_per_sec,
                    eta_s,
                )
            return True

        # A new campaign, or the first job on a newly set eval set: its baseline, before the first step.
        if evaluator is not None and evaluation.at_start and not own_resume and global_step < end_step:
            run_evaluations(global_step, job_split=False, in_loop=False)

        # ---- the loop ---------------------------------------------------------------------------------------
        # Each pass computes step N+1's gradients, then reports step N (whose figures are ready by then), asks
        # whether to stop, and only then applies N+1. A step computed but not applied (a stop, a failure) is
        # undone: its gradients dropped, the random generators rewound.
        loop_start = loop_end = time.perf_counter()
        try:
            while global_step < end_step:
                if pending is None and should_stop is not None and should_stop():
                    status = TrainingStatus.STOPPED
                    break
                # The in-memory model now moves past every checkpoint: it can no longer stand in for one.
                self._warm_checkpoint = None
                rng_before = RngState.capture()
                batches = prefetch.next()
                if counts is None:
                    n_tokens, n_loss = sum(b.num_tokens for b in batches), sum(b.num_loss_tokens for b in batches)
                else:
                    n_tokens, n_loss = step_counts.pop(job_step)
                step_loss, grad_norm = self._compute_step(model, batches, n_loss, kernel, autocast, params, max_norm)

                if pending is not None:
                    ok = report(pending)
                    pending = None
                    stop = ok and should_stop is not None and should_stop()
                    if not ok or stop:
                        optimizer.zero_grad(set_to_none=True)
                        rng_before.restore()
                        if not ok:
                            global_step, job_step = global_step - 1, job_step - 1  # it was skipped on the device
                        else:
                            status = TrainingStatus.STOPPED
                        break

                done = PendingStep(global_step + 1, lr_at(global_step, hp), n_tokens, step_loss, n_loss, grad_norm)
                if not defer and not done.finite():  # this optimizer cannot skip on the device: look first
                    optimizer.zero_grad(set_to_none=True)
                    report(done)
                    break
                apply_update(optimizer, done.lr, not_finite_flag(step_loss, grad_norm) if defer else None)
                done.applied_at = time.perf_counter()
                done.start_copy()
                global_step += 1
                job_step += 1
                pending = done

                # ---- validate and save on schedule (and the last step): these read the step back now ----------
                evaluate = hp.eval_steps > 0 and global_step % hp.eval_steps == 0 and global_step < end_step
                checkpoint = global_step % hp.save_steps == 0 and global_step < end_step
                if evaluate or checkpoint or global_step == end_step:
                    ok = report(pending)
                    pending = None
                    if not ok:
                        global_step, job_step = global_step - 1, job_step - 1
                        break
                    if evaluate and (data.val or evaluator is not None):
                        val_loss = run_evaluations(global_step, job_split=True, in_loop=True)
                        if val_loss is not None:
                            val_history.append((global_step, val_loss))
                            logger.info("run %s step %d val loss %.4f", run_id, global_step, val_loss)
                    if checkpoint:
                        last_checkpoint = save()
            loop_end = time.perf_counter()

            # ---- the end: validate, then checkpoint ------------------------------------------------------------
            # A stopped job saves at once (it is being preempted or cancelled; it validates when it completes).
            # A failed one saves nothing: its last good checkpoint stays the latest.
            final_val_loss = None
            if status == TrainingStatus.COMPLETED and (data.val or evaluator is not None):
                final_val_loss = run_evaluations(global_step, job_split=True, in_loop=False)
                if global_step > start_step and final_val_loss is not None:
                    val_history.append((global_step, final_val_loss))
            if status == TrainingStatus.FAILED:
                self._forget_warm()
            elif global_step > start_step or (resumed is None and status == TrainingStatus.COMPLETED):
                last_checkpoint = save()
        except BaseException:
            # Whatever went wrong, the in-memory model may be half-way through a step.
            self._forget_warm()
            raise
        finally:
            prefetch.close()

        train_s = loop_end - loop_start - eval_cost["in_loop_s"]
        final_eval = eval_history[-1] if eval_history and eval_history[-1].step == global_step else None
        return TrainingResult(
            status=status.value,
            start_step=start_step,
            final_step=global_step,
            total_steps=end_step,
            # the job's own last step, also when a resumed attempt found it already done (its history came back)
            final_loss=loss_history[-1][1] if loss_history and loss_history[-1][0] == global_step else None,
            final_val_loss=final_val_loss,
            trained_tokens=trained_tokens,
            tokens_per_sec=trained_tokens / train_s if train_s > 0 else 0.0,
            num_examples=data.num_examples,
            num_train_examples=len(data.train),
            num_val_examples=len(data.val),
            num_truncated=data.num_truncated,
            num_dropped=data.num_dropped,
            checkpoint_path=str(last_checkpoint) if last_checkpoint is not None else None,
            error=error,
            loss_history=list(loss_history),
            val_history=list(val_history),
            setup_s=(loop_start - entered),
            teardown_s=time.perf_counter() - loop_end,
            warnings=warnings,
            attention=path.value if path else "model",
            loss_kernel=kernel.value,
            final_eval_loss=final_eval.loss if final_eval is not None else None,
            eval_history=list(eval_history),
            train_s=train_s,
            eval_s=eval_cost["total_s"],
        )

    # ------------------------------------------------------------------------------------------- internals

    def _compute_step(self, model, batches, n_loss: int, kernel, autocast, params, max_norm: float):
        """Forward and backward over a step's micro-batches, then gradient clipping; returns the summed loss and
        the gradient norm, both still on the device (nothing here waits for it)."""
        # Token-weighted mean over the whole step: each micro-batch adds its summed loss / the step's count,
        # so accumulation gives the same gradient as one big batch. On several ranks the count is the step's over
        # all of them and the ranks' gradients are summed (engine.data_parallel): the same gradient again.
        parallel = self._parallel
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            if self.compile and batch.layout is not None and batch.layout.cu_seqlens is not None:
                torch._dynamo.mark_dynamic(batch.layout.cu_seqlens, 0)  # the segment count varies: one graph
            with parallel.micro_batch(last=i == len(batches) - 1) if parallel else contextlib.nullcontext():
                with autocast:
                    summed = self._loss_fn(model, batch, kernel)
                (summed / n_loss).backward()
            step_loss += summed.detach()
        if parallel is None:
            return step_loss, torch.nn.utils.clip_grad_norm_(params, max_norm)
        parallel.sum_loss(step_loss)
        return step_loss, parallel.clip(params, max_norm)

    @staticmethod
    def _batch(rows, examples, picked, pad_id, path, length=None, num_rows=None) -> Batch:
        """Collate rows ``picked`` and give the batch the document layout its attention path needs."""
        batch = collate([rows[r] for r in picked], examples, pad_id, length, num_rows)
        if path is not None:
            batch.layout = layout_for(
                path,
                batch.documents,
                batch.input_ids.shape[1],
                batch.example_index,
                compiled=path is AttentionPath.FLEX,
            )
        return batch

    def _load(self, model_path: str, resume_from: Path | None, config: TrainerConfig, world: World | None = None):
        """The model and optimizer to train: the warm ones when they are exactly ``resume_from``, else loaded
        (and, with a world, wrapped for data-parallel training: collective, every rank loads at once)."""
        hp = config.hyperparams
        warm = (
            self._model is not None
            and resume_from is not None
            and self._warm_checkpoint is not None
            and self._model_path == str(model_path)
            and _same_path(resume_from, self._warm_checkpoint)
            and (self._parallel.sharding if self._parallel else None) == (hp.sharding if world else None)
        )
        if warm:
            logger.info("reusing the in-memory model of %s", resume_from)
            model, optimizer = self._model, self._optimizer
        else:
            self._forget_warm()
            # engine.adapters: full tuning loads the checkpoint; LoRA/QLoRA load the base and the checkpoint's adapter.
            source = weights_source(model_path, resume_from, config.finetune)
            model = prepare_model(load_model(source, **load_kwargs(config, self.device)), config, self.device,
                                  resume_from)
            # With a world: DDP, or FSDP sharding the parameters, before the optimizer is built over them.
            self._parallel = DataParallel(model, world, hp.sharding) if world is not None else None
            optimizer = build_optimizer(model, self.device)
            if resume_from is not None:
                load_optimizer_state(resume_from, optimizer,
                                     self._parallel.load_optimizer_state if self._parallel else None)
            if self.compile:
                compile_layers(model)
            self._model, self._optimizer, self._model_path = model, optimizer, str(model_path)
        self._loss_fn = self._parallel.loss if self._parallel is not None else loss_sum
        # The config of this job applies, whatever the checkpoint's was (the LR is set at every step).
        opt = config.optimizer
        for group in optimizer.param_groups:
            group["betas"] = (opt.beta1, opt.beta2)
            group["eps"] = opt.eps
            group["weight_decay"] = opt.weight_decay if group.get("name") == "decay" else 0.0
        set_activation_checkpointing(model, hp.gradient_checkpointing)  # a warm model may have had it on
        model.train()
        return model, optimizer

    def _forget_warm(self) -> None:
        self._warm_checkpoint = None

    def _evaluate(self, model, data: PreparedDataset, batch_size: int, autocast, path, static: bool) -> float:
        """Token-weighted mean loss over the validation examples (in batches of the training shape if ``static``)."""
        shape = (data.row_length, batch_size) if static else (None, None)

        def make_batch(rows, examples) -> Batch:
            return self._batch(rows, examples, range(len(rows)), data.pad_id, path, *shape)

        total, count = loss_over(model, data.val_rows, data.val, per_batch=batch_size, make_batch=make_batch,
                                 device=self.device, autocast=autocast, loss_fn=self._loss_fn)
        return total / count

    def _evaluator(self, spec: EvalSpec, model_path: str, chat: ChatOptions | None) -> Evaluator:
        """The evaluator of ``spec`` for this model's tokenizer: built once, kept while the set is in use.

        Raises:
            EvalSetInvalid, EvalSetTooLarge: see :meth:`engine.evaluation.Evaluator.build`.
        """
        key = (dataclasses.replace(spec, at_start=False), model_path, chat)
        with self._lock:
            cached = self._evaluators.get(key)
        if cached is not None:
            return cached
        tokenizer = self._tokenizer(model_path)
        with self._tokenize_lock:
            evaluator = Evaluator.build(spec, tokenizer, chat)
        logger.info("eval set %s: %d examples, %d tokens (%d carry loss) at max_length %d, %d probes", spec.name[:12],
                    len(evaluator.data.examples), evaluator.data.num_tokens, evaluator.data.num_loss_tokens,
                    spec.max_length, len(spec.probes))
        with self._lock:
            self._evaluators[key] = evaluator
            while len(self._evaluators) > _EVALUATOR_CACHE_SIZE:
                self._evaluators.pop(next(iter(self._evaluators)))
        return evaluator


def _read_dataset(dataset: Dataset) -> Sequence[Example]:
    if isinstance(dataset, (str, os.PathLike)):
        try:
            return read_examples(dataset)
        except DatasetError as exc:
            raise DatasetInvalid(str(exc)) from None
    return dataset


def _dataset_key(dataset: Dataset) -> tuple:
    """Identifies a dataset's content cheaply: a file by path, size and mtime; a list by its examples."""
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset).resolve()
        try:
            st = path.stat()
        except OSError:
            return ("path", str(path))
        return ("path", str(path), st.st_size, st.st_mtime_ns)
    return ("examples", tuple(dataset))


def _same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
