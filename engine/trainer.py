"""The training loop: :class:`TrainerEngine` runs one job (a dataset, a config) and returns a TrainingResult.

The engine knows nothing of queues. It takes a dataset, a resolved config, a progress callback and a stop check,
trains from a model directory or a checkpoint, writes checkpoints into a directory, and returns what happened.
One engine per worker process: it keeps the last model and optimizer in memory, so the next job of the same
campaign, which resumes from the checkpoint this engine just wrote, starts without reloading anything.
"""

from __future__ import annotations

import contextlib
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
from engine.adapters import load_kwargs, prepare_model, weights_source
from engine.batches import DataOrder, job_steps
from engine.chat_turns import ChatOptions
from engine.checkpoint import (
    load_optimizer_state,
    read_checkpoint_state,
    remove_stale_temp_dirs,
    restore_rng,
    save_checkpoint,
)
from engine.dataset import PreparedDataset, prepare_dataset
from engine.errors import DatasetInvalid, ModelLoadError
from engine.formats import DatasetError, Example, read_examples
from engine.loss import loss_sum
from engine.packing import collate
from engine.result import TrainingResult, TrainingStatus
from engine.schedule import lr_at

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float, float, float, float], None]
Dataset = str | os.PathLike | Sequence[Example] | PreparedDataset

_PREPARED_CACHE_SIZE = 3  # the running job's data, the next job's, and one spare


class TrainerEngine:
    """Runs training jobs one after another in this process, keeping the model warm between them.

    Args:
        verbose: log every optimizer step at INFO (otherwise about every 10% of a job).
        device: "cuda", "cpu", ...; by default CUDA when available, else the CPU.
        compile: run the forward and backward through ``torch.compile`` (rows padded to a fixed length so shapes
            stay static). The first step of a new model pays the compile time.
    """

    def __init__(self, verbose: bool = False, device: str | None = None, compile: bool = False):
        self.verbose = verbose
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compile = compile
        self._lock = threading.Lock()  # guards the caches below
        self._tokenize_lock = threading.Lock()  # a Rust tokenizer must not be driven from two threads at once
        self._tokenizers: dict[str, Any] = {}
        self._prepared: dict[tuple, Future] = {}
        # The warm model: valid to reuse only while it equals the checkpoint named by _warm_checkpoint.
        self._model = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._model_path: str | None = None
        self._warm_checkpoint: Path | None = None
        self._loss_fn = loss_sum

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
    ) -> TrainingResult:
        """Train one job and return its result.

        Args:
            dataset: a ``.jsonl`` path, a list of :class:`engine.formats.Example`, or the output of :meth:`prepare`.
            config: the resolved config.
            on_progress: ``on_progress(step, total_steps, loss, lr, tokens_per_sec, eta_s)`` after every optimizer
                step; ``step`` is the global step just completed, ``total_steps`` the global step this job ends at.
            should_stop: polled before every optimizer step; True stops the job after saving a checkpoint.
            model_path: the model directory (weights when starting fresh, and always the tokenizer).
            checkpoint_dir: where this job writes its ``step-N`` checkpoints.
            resume_from: a checkpoint. One this job wrote (same ``run_id``) resumes everything, data position
                included; another job's continues the campaign (global step, weights, optimizer, LR schedule, RNG)
                with this job's data from its start.
            run_id: the job's id, recorded in its checkpoints.
            enable_packing: the final packing switch when not None (the caller resolves ``ENABLE_PACKING``);
                otherwise ``config.data.enable_packing``.
            chat: the hero's chat options, see :meth:`prepare`.

        Returns:
            The result; status "completed", "stopped" or "failed" (non-finite loss).

        Raises:
            DatasetInvalid: the data cannot be trained on (the caller skips the job).
            ModelLoadError: the model or tokenizer cannot be loaded.
            CheckpointError: ``resume_from`` is not a complete, readable checkpoint.
        """
        entered = time.perf_counter()
        config = for_ranks(config, 1)  # config.batching: a global batch becomes this one rank's accumulation
        hp = config.hyperparams
        checkpoint_dir = Path(checkpoint_dir)

        # ---- data: prepared ahead by prepare(), or now --------------------------------------------------------
        data = self.prepare(dataset, config, model_path=model_path, enable_packing=enable_packing, chat=chat)
        order = DataOrder(len(data.rows), hp.batch_size, hp.seed, shuffle=config.data.shuffle)
        ga = hp.gradient_accumulation_steps

        # ---- where this job starts: a fresh campaign, a campaign continued, or this job resumed ----------------
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(checkpoint_dir)
        resumed = read_checkpoint_state(resume_from) if resume_from is not None else None
        global_step = resumed["global_step"] if resumed else 0
        job_step, job_start, loss_history, val_history = 0, global_step, [], []
        if resumed and resumed.get("run_id") == run_id:
            if resumed.get("position", {}).get("data_fingerprint") == data.fingerprint:
                # The same job after a crash or a stop: continue its data where it was.
                job_step, job_start = resumed["job_step"], resumed["job_start_step"]
                loss_history = [tuple(p) for p in resumed.get("loss_history", [])]
                val_history = [tuple(p) for p in resumed.get("val_history", [])]
            else:
                logger.warning(
                    "run %s resumes from %s but its data changed; its data starts again from the beginning",
                    run_id,
                    resume_from,
                )
        end_step = job_start + job_steps(order, hp)
        logger.info(
            "run %s: steps %d -> %d (job step %d), %d train rows, %d val examples, resume from %s",
            run_id,
            global_step,
            end_step,
            job_step,
            len(data.rows),
            len(data.val),
            resume_from,
        )

        # ---- model and optimizer: warm from the last job, or loaded ---------------------------------------------
        model, optimizer = self._load(model_path, resume_from, config)
        tokenizer = self._tokenizer(str(model_path))
        if resume_from is not None:
            restore_rng(resume_from)
        else:
            torch.manual_seed(hp.seed)
            random.seed(hp.seed)
        autocast = _autocast(self.device, hp.precision)
        # Compiled: every micro-batch gets the same shape (full rows, batch_size of them), so it compiles once.
        fixed_length, fixed_rows = (data.row_length, hp.batch_size) if self.compile else (None, None)
        params = [p for p in model.parameters() if p.requires_grad]

        def checkpoint_state() -> dict[str, Any]:
            return {
                "global_step": global_step,
                "run_id": run_id,
                "job_step": job_step,
                "job_start_step": job_start,
                "job_total_steps": end_step - job_start,
                "epoch": order.epoch_of(job_step * ga),
                "position": {"micro_batch": job_step * ga, "data_fingerprint": data.fingerprint},
                # The LR is a function of the global step: these say which, and the last value used.
                "scheduler": {
                    "name": hp.lr_scheduler,
                    "learning_rate": hp.learning_rate,
                    "warmup_steps": hp.warmup_steps,
                    "decay_steps": hp.decay_steps,
                    "last_lr": lr_at(global_step - 1, hp) if global_step > 0 else None,
                },
                "config_hash": config.config_hash(),
                "config": config.to_dict(),
                "model_path": str(model_path),
                "loss_history": loss_history,
                "val_history": val_history,
                "saved_at": time.time(),
            }

        def save() -> Path:
            path = save_checkpoint(
                checkpoint_dir, global_step, model, optimizer, tokenizer, checkpoint_state(), hp.save_total_limit
            )
            self._warm_checkpoint = path
            return path

        last_checkpoint = Path(resume_from) if resume_from is not None else None
        start_step = global_step
        status, error = TrainingStatus.COMPLETED, None
        trained_tokens = 0
        log_every = 1 if self.verbose else max(1, (end_step - global_step) // 10)

        # ---- the loop ---------------------------------------------------------------------------------------
        loop_start = last_step_end = time.perf_counter()
        try:
            while global_step < end_step:
                if should_stop is not None and should_stop():
                    status = TrainingStatus.STOPPED
                    break
                # The in-memory model now moves past every checkpoint: it can no longer stand in for one.
                self._warm_checkpoint = None
                batches = [
                    collate(
                        [data.rows[r] for r in order.micro_batch(job_step * ga + a)],
                        data.train,
                        data.pad_id,
                        fixed_length,
                        fixed_rows,
                    )
                    for a in range(ga)
                ]
                n_loss = sum(b.num_loss_tokens for b in batches)
                lr = lr_at(global_step, hp)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # Token-weighted mean over the whole step: each micro-batch adds its summed loss / the step's count,
                # so accumulation gives the same gradient as one big batch.
                step_loss = torch.zeros((), device=self.device)
                for batch in batches:
                    batch = batch.to(self.device)
                    if self.compile:  # the number of loss tokens varies: one graph for all of them
                        torch._dynamo.mark_dynamic(batch.loss_positions, 0)
                        torch._dynamo.mark_dynamic(batch.loss_targets, 0)
                    with autocast:
                        summed = self._loss_fn(model, batch)
                    (summed / n_loss).backward()
                    step_loss += summed.detach()
                max_norm = hp.max_grad_norm if hp.max_grad_norm > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

                # One host sync per step (free on the CPU): the loss for on_progress and the finiteness check,
                # before the optimizer can write a non-finite update into the weights.
                loss_value, norm_value = torch.stack([step_loss / n_loss, grad_norm.to(step_loss.device)]).tolist()
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    optimizer.zero_grad(set_to_none=True)
                    status = TrainingStatus.FAILED
                    error = (
                        f"non-finite loss at step {global_step + 1} (loss {loss_value}, gradient norm "
                        f"{norm_value}); the step was not applied nor saved. Last good checkpoint: "
                        f"{last_checkpoint}. Lower hyperparams.learning_rate or check the data"
                    )
                    logger.error("run %s: %s", run_id, error)
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                job_step += 1
                trained_tokens += sum(b.num_tokens for b in batches)
                loss_history.append((global_step, loss_value))

                # ---- report --------------------------------------------------------------------------------
                last_step_end = time.perf_counter()
                elapsed = last_step_end - loop_start
                tokens_per_sec = trained_tokens / elapsed if elapsed > 0 else 0.0
                eta_s = (end_step - global_step) * elapsed / (global_step - start_step)
                if on_progress is not None:
                    on_progress(global_step, end_step, loss_value, lr, tokens_per_sec, eta_s)
                if global_step % log_every == 0 or global_step == end_step:
                    logger.info(
                        "run %s step %d/%d loss %.4f lr %.3g %.0f tok/s eta %.0fs",
                        run_id,
                        global_step,
                        end_step,
                        loss_value,
                        lr,
                        tokens_per_sec,
                        eta_s,
                    )

                # ---- validate and save on schedule -----------------------------------------------------------
                if hp.eval_steps > 0 and global_step % hp.eval_steps == 0 and global_step < end_step and data.val:
                    val_history.append((global_step, self._evaluate(model, data, hp.batch_size, autocast)))
                    logger.info("run %s step %d val loss %.4f", run_id, global_step, val_history[-1][1])
                if global_step % hp.save_steps == 0 and global_step < end_step:
                    last_checkpoint = save()
            loop_end = last_step_end

            # ---- the end: validate, then checkpoint ------------------------------------------------------------
            # A stopped job saves at once (it is being preempted or cancelled; it validates when it completes).
            # A failed one saves nothing: its last good checkpoint stays the latest.
            final_val_loss = None
            if status == TrainingStatus.COMPLETED and data.val:
                final_val_loss = self._evaluate(model, data, hp.batch_size, autocast)
                if global_step > start_step:
                    val_history.append((global_step, final_val_loss))
            if status == TrainingStatus.FAILED:
                self._forget_warm()
            elif global_step > start_step or (resumed is None and status == TrainingStatus.COMPLETED):
                last_checkpoint = save()
        except BaseException:
            # Whatever went wrong, the in-memory model may be half-way through a step.
            self._forget_warm()
            raise

        loop_s = loop_end - loop_start
        return TrainingResult(
            status=status.value,
            start_step=start_step,
            final_step=global_step,
            total_steps=end_step,
            final_loss=loss_history[-1][1] if global_step > start_step else None,
            final_val_loss=final_val_loss,
            trained_tokens=trained_tokens,
            tokens_per_sec=trained_tokens / loop_s if loop_s > 0 else 0.0,
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
        )

    # ------------------------------------------------------------------------------------------- internals

    def _load(self, model_path: str, resume_from: Path | None, config: TrainerConfig):
        """The model and optimizer to train: the warm ones when they are exactly ``resume_from``, else loaded."""
        hp = config.hyperparams
        warm = (
            self._model is not None
            and resume_from is not None
            and self._warm_checkpoint is not None
            and self._model_path == str(model_path)
            and _same_path(resume_from, self._warm_checkpoint)
        )
        if warm:
            logger.info("reusing the in-memory model of %s", resume_from)
            model, optimizer = self._model, self._optimizer
        else:
            self._forget_warm()
            # engine.adapters: full tuning loads the checkpoint; LoRA/QLoRA load the base and the checkpoint's adapter.
            source = weights_source(model_path, resume_from, config.finetune)
            model = prepare_model(_load_model(source, **load_kwargs(config, self.device)), config, self.device,
                                  resume_from)
            optimizer = _build_optimizer(model, self.device)
            if resume_from is not None:
                load_optimizer_state(resume_from, optimizer)
            self._model, self._optimizer, self._model_path = model, optimizer, str(model_path)
            self._loss_fn = torch.compile(loss_sum, dynamic=False) if self.compile else loss_sum
        # The config of this job applies, whatever the checkpoint's was (the LR is set at every step).
        opt = config.optimizer
        for group in optimizer.param_groups:
            group["betas"] = (opt.beta1, opt.beta2)
            group["eps"] = opt.eps
            group["weight_decay"] = opt.weight_decay if group.get("name") == "decay" else 0.0
        _set_activation_checkpointing(model, hp.gradient_checkpointing)  # a warm model may have had it on
        model.train()
        return model, optimizer

    def _forget_warm(self) -> None:
        self._warm_checkpoint = None

    def _evaluate(self, model, data: PreparedDataset, batch_size: int, autocast) -> float:
        """Token-weighted mean loss over the validation examples."""
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        try:
            with torch.no_grad():
                for i in range(0, len(data.val_rows), batch_size):
                    batch = collate(data.val_rows[i : i + batch_size], data.val, data.pad_id).to(self.device)
                    with autocast:
                        total += loss_sum(model, batch).double()
                    count += batch.num_loss_tokens
        finally:
            model.train()
        return total.item() / count


def _load_model(source: Path, **overrides):
    from transformers import AutoModelForCausalLM

    try:
        # fp32 master weights whatever the checkpoint's dtype: bf16 runs under autocast where it is supported.
        # use_safetensors: weights that exist only as a pickle (.bin) are refused, never unpickled.
        # overrides: engine.adapters.load_kwargs (a bf16 frozen base for LoRA, a 4-bit one for QLoRA).
        kwargs = {"dtype": torch.float32, "use_safetensors": True, **overrides}
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported the same way
        raise ModelLoadError(f"cannot load a causal LM from {source}: {type(exc).__name__}: {exc}") from None


def _set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute activations in the backward pass (less memory, ~30% more compute) or not."""
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; older ones have only the former.
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _build_optimizer(model, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases).

    Fused (one kernel over all parameters) on CUDA and on the CPU, where it is ~4x faster than the default
    for-each implementation; other devices get the default.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay"}]
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=0.0, fused=True)
        except (RuntimeError, TypeError):  # an older torch or a dtype the fused kernel does not take
            pass
    return torch.optim.AdamW(groups, lr=0.0)


def _autocast(device: torch.device, precision: str):
    """bf16 autocast for "bf16", and for "auto" on a GPU that supports it; fp32 (no autocast) otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
