"""What one training job returns: :class:`TrainingResult`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.eval_plan import EvalPoint


class TrainingStatus(str, Enum):
    """How a job's training ended."""

    COMPLETED = "completed"  # every planned step ran and the final checkpoint is written
    STOPPED = "stopped"  # should_stop() asked; a checkpoint at the stop step is written; never a success
    FAILED = "failed"  # the loss went NaN/inf; the last good checkpoint is kept, the bad step is not saved


@dataclass
class TrainingResult:
    """The outcome of :meth:`engine.trainer.TrainerEngine.run_job`.

    Steps are global (campaign) optimizer steps: ``start_step`` is where this call began, ``final_step`` where it
    ended and ``total_steps`` where the job ends when it runs to completion.
    """

    status: str  # a TrainingStatus value
    start_step: int
    final_step: int
    total_steps: int
    final_loss: float | None  # the loss of the job's last step (from its checkpoint when this call resumed there)
    final_val_loss: float | None  # token-weighted mean over the validation examples
    trained_tokens: int  # non-pad input tokens of every micro-batch trained by this call
    tokens_per_sec: float  # trained_tokens / train_s (the training loop's time, evaluations left out)
    num_examples: int
    num_train_examples: int
    num_val_examples: int
    num_truncated: int  # examples cut at max_length that kept some loss tokens
    num_dropped: int  # examples whose every loss token fell beyond max_length
    checkpoint_path: str | None  # the last complete checkpoint directory
    error: str | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (global step, loss), this job
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (global step, val loss), this job
    setup_s: float = 0.0  # run_job entry to the start of its first optimizer step
    teardown_s: float = 0.0  # end of the last optimizer step to run_job's return (final eval and save)
    warnings: list[str] = field(default_factory=list)  # for the user: LR at 0, determinism not guaranteed, ...
    attention: str | None = None  # the attention path that ran (engine.attention.AttentionPath, or "model")
    loss_kernel: str | None = None  # the loss kernel that ran (engine.loss.LossKernel)
    final_eval_loss: float | None = None  # the fixed eval set's loss at final_step (None: not evaluated there)
    eval_history: list[EvalPoint] = field(default_factory=list)  # each evaluation of the fixed eval set, this job
    train_s: float = 0.0  # the training loop's wall time, evaluations inside it left out (tokens_per_sec's base)
    eval_s: float = 0.0  # every evaluation of this call: validation split, fixed set and probe answers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loss_history"] = [list(p) for p in self.loss_history]
        data["val_history"] = [list(p) for p in self.val_history]
        data["eval_history"] = [p.to_dict() for p in self.eval_history]
        return data
