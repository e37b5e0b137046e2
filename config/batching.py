"""The global batch: how many rows one optimizer step sees, whatever the number of ranks (GPUs) training it.

    rows per optimizer step = batch_size (micro-batch per rank) x ranks x accumulation

Precedence:

* ``hyperparams.global_batch_size > 0``: it is the global batch; ``accumulation = global / (batch_size x ranks)``
  and ``gradient_accumulation_steps`` is ignored.
* ``global_batch_size == 0`` (the default): the global batch is ``batch_size x gradient_accumulation_steps``, the
  meaning these two always had on one rank; on N ranks the accumulation is divided by N.

Either way the global batch of a campaign does not depend on the worker that runs a job: a campaign continued on
another number of GPUs keeps its global batch, so its steps and its LR schedule (a function of the global step)
mean the same thing. A width that does not divide the global batch is refused with the values that would work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from config.errors import ConfigError
from config.schema import Hyperparams, TrainerConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step is cut: ``micro_batch`` rows per forward on each of ``ranks``, ``accumulation`` times."""

    micro_batch: int
    ranks: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.ranks * self.accumulation


def global_batch(hp: Hyperparams) -> int:
    """Rows per optimizer step, over all ranks (see the module docstring for the precedence)."""
    return hp.global_batch_size or hp.batch_size * hp.gradient_accumulation_steps


def plan_batch(hp: Hyperparams, ranks: int = 1) -> BatchPlan:
    """The accumulation that keeps the global batch on ``ranks`` ranks.

    Raises:
        ConfigError: ``batch_size x ranks`` does not divide the global batch; the message lists what would.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    total = global_batch(hp)
    per_step = hp.batch_size * ranks
    if total % per_step:
        source = (f"hyperparams.global_batch_size {total}" if hp.global_batch_size else
                  f"the global batch {total} (batch_size {hp.batch_size} x gradient_accumulation_steps "
                  f"{hp.gradient_accumulation_steps})")
        widths = [n for n in range(1, 9) if total % (hp.batch_size * n) == 0]
        divisors = [b for b in range(1, hp.batch_size + 1) if total % (b * ranks) == 0]
        fix = f"set global_batch_size to a multiple of {per_step} (e.g. {per_step * -(-total // per_step)})"
        if divisors:
            fix += f", or batch_size to {divisors[-1]}"
        fix += f"; as it is, it divides over {', '.join(map(str, widths)) or 'no'} rank(s)"
        raise ConfigError([f"{source} does not divide over {ranks} ranks x batch_size {hp.batch_size}: {fix}"])
    return BatchPlan(micro_batch=hp.batch_size, ranks=ranks, accumulation=total // per_step)


def for_ranks(config: TrainerConfig, ranks: int = 1) -> TrainerConfig:
    """``config`` as one rank of ``ranks`` runs it: ``gradient_accumulation_steps`` set to the plan's accumulation.

    The engine reads only ``batch_size`` and ``gradient_accumulation_steps``; this is where the global batch
    becomes those two for a given width. A config that already runs this way comes back unchanged (so one rank
    with no ``global_batch_size`` keeps its config and its hash); otherwise ``global_batch_size`` is written too,
    which makes the call idempotent.

    Raises:
        ConfigError: see :func:`plan_batch`.
    """
    plan = plan_batch(config.hyperparams, ranks)
    if plan.accumulation == config.hyperparams.gradient_accumulation_steps:
        return config
    hp = dataclasses.replace(config.hyperparams, gradient_accumulation_steps=plan.accumulation,
                             global_batch_size=plan.global_batch)
    return dataclasses.replace(config, hyperparams=hp)
