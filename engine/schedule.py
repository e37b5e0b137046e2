"""The learning rate as a pure function of the global (campaign) step.

There is no scheduler object to save or restore: a job that continues a campaign at step 500 gets the LR of step
500, so warmup happens once per campaign, never again at the start of a job.

``step`` below is the number of optimizer steps already taken, i.e. the 0-based index of the step about to run.
"""

from __future__ import annotations

import math

from config.schema import DECAYING_SCHEDULERS, Hyperparams


def lr_at(step: int, hp: Hyperparams) -> float:
    """The learning rate of the optimizer step with 0-based global index ``step``.

    * ``constant``: ``learning_rate`` throughout.
    * ``constant_with_warmup``: linear warmup over ``warmup_steps`` (reaching the full LR at the last warmup step,
      so no step is wasted at LR 0), then constant.
    * ``linear`` / ``cosine``: the same warmup, then a decay to 0 at step ``decay_steps``, 0 after it;
      ``decay_steps == 0`` means no decay (constant after warmup).
    """
    base = hp.learning_rate
    name = hp.lr_scheduler
    if name == "constant":
        return base
    if step < hp.warmup_steps:
        return base * (step + 1) / hp.warmup_steps
    if name == "constant_with_warmup" or hp.decay_steps <= 0:
        return base
    span = hp.decay_steps - hp.warmup_steps
    if span <= 0 or step >= hp.decay_steps:
        return 0.0
    progress = (step - hp.warmup_steps) / span
    if name == "linear":
        return base * (1.0 - progress)
    if name == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {name!r}")


def schedule_warnings(hp: Hyperparams, first_step: int, end_step: int) -> list[str]:
    """What the user should hear about this job's learning rates: steps at LR 0 train nothing."""
    if end_step <= first_step:
        return []
    if hp.learning_rate == 0:
        return ["hyperparams.learning_rate is 0: this job does not change the weights"]
    if hp.lr_scheduler not in DECAYING_SCHEDULERS or hp.decay_steps <= 0 or end_step <= hp.decay_steps:
        return []
    if first_step >= hp.decay_steps:
        return [
            f"the campaign's LR reached 0 at step {hp.decay_steps} (hyperparams.decay_steps) and this job runs steps "
            f"{first_step + 1}-{end_step}: it does not change the weights. Raise hyperparams.decay_steps for the "
            "campaign, or start a new campaign"
        ]
    return [
        f"the campaign's LR reaches 0 at step {hp.decay_steps} (hyperparams.decay_steps); this job's steps "
        f"{hp.decay_steps + 1}-{end_step} do not change the weights. Raise hyperparams.decay_steps to train on all "
        "of its data"
    ]
