"""One optimizer step on the device, and reading its loss back without stalling the device.

The training loop launches step N+1 before it looks at step N's loss: reading a GPU value makes the host wait for
every kernel queued before it, so reading step N's loss right after step N would leave the GPU idle while the host
prepares step N+1. Instead:

* the step's "is the loss and gradient norm finite" test runs on the device, and the fused AdamW kernel skips the
  update when it is not (``found_inf``, the mechanism torch's GradScaler uses), so a bad step never reaches the
  weights even though the host does not know yet;
* the loss and gradient norm are copied to pinned host memory asynchronously, with an event; the host reads them
  one step later (:meth:`PendingStep.read`), when they are long done.

On the CPU all of this is synchronous and costs nothing. An optimizer that cannot skip on the device (not
fused) is read back at once, before its update (``defers=False``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch


def optimizer_can_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step()`` honours ``found_inf`` (the fused Adam/AdamW kernels)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


@dataclass
class PendingStep:
    """An optimizer step applied (or skipped, if not finite) on the device whose figures the host has not read."""

    step: int  # the global step it completes (1-based)
    lr: float
    num_tokens: int
    loss_sum: torch.Tensor  # 0-d, on the device: summed token losses
    num_loss_tokens: int
    grad_norm: torch.Tensor  # 0-d, on the device
    applied_at: float = 0.0  # perf_counter when the host launched its update
    _host: torch.Tensor | None = field(default=None, repr=False)
    _event: object | None = field(default=None, repr=False)

    def start_copy(self) -> None:
        """Begin copying the loss and norm to the host (asynchronous on CUDA)."""
        values = torch.stack([self.loss_sum.float() / self.num_loss_tokens, self.grad_norm.float()])
        if values.is_cuda:
            self._host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def read(self) -> tuple[float, float]:
        """(mean loss, gradient norm) as Python floats; waits only for this step's own kernels."""
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        loss, norm = self._host.tolist()
        return loss, norm

    def finite(self) -> bool:
        loss, norm = self.read()
        return math.isfinite(loss) and math.isfinite(norm)


def not_finite_flag(loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on the device: 1.0 when the step must be skipped (loss or norm not finite), else 0.0."""
    ok = torch.isfinite(loss_sum) & torch.isfinite(grad_norm.to(loss_sum.device))
    return (~ok).to(torch.float32)


def apply_update(optimizer: torch.optim.Optimizer, lr: float, skip: torch.Tensor | None) -> None:
    """Set the LR and step the optimizer; ``skip`` (see :func:`not_finite_flag`) makes the fused kernel leave the
    parameters and its state untouched when it is 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if skip is not None:
        optimizer.found_inf = skip  # read by fused Adam/AdamW's step
    try:
        optimizer.step()
    finally:
        if skip is not None:
            del optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ undoing a step


@dataclass(frozen=True)
class RngState:
    """Every random generator the training step draws from, to rewind a step that is computed but not applied."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]
    python: tuple

    @classmethod
    def capture(cls) -> RngState:
        cuda = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.get_rng_state(), cuda, random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(list(self.cuda))
        random.setstate(self.python)
