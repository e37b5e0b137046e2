"""The order of training data: which rows make micro-batch ``j`` of a job, and how many steps a job takes.

Rows are shuffled once per epoch with a generator seeded by ``(seed, epoch)``, so the whole order is a function
of the seed: a job's data position is just the number of micro-batches it has consumed, and a resumed job picks
up exactly where it was.
"""

from __future__ import annotations

import math
import random

from config.schema import Hyperparams


class DataOrder:
    """Epochs of (optionally shuffled) rows, cut into micro-batches of ``batch_size`` rows.

    The last micro-batch of an epoch may be smaller; epochs follow each other without end.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_rows <= 0:
            raise ValueError("no rows to train on")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epochs: dict[int, list[int]] = {}

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.micro_batches_per_epoch

    def micro_batch(self, j: int) -> list[int]:
        """The row indices of micro-batch ``j`` (0-based, counted from the job's start)."""
        epoch, k = divmod(j, self.micro_batches_per_epoch)
        order = self._epoch_order(epoch)
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epochs = {epoch: order}  # epochs are visited in order: keep one
        return self._epochs[epoch]


def job_steps(order: DataOrder, hp: Hyperparams, micro_batches_per_step: int | None = None) -> int:
    """Optimizer steps of one job: ``max_steps`` when set, else what ``epochs`` passes over the data take.

    ``micro_batches_per_step``: over all ranks (``gradient_accumulation_steps`` of one process by default).
    """
    if hp.max_steps > 0:
        return hp.max_steps
    per_step = micro_batches_per_step or hp.gradient_accumulation_steps
    return math.ceil(hp.epochs * order.micro_batches_per_epoch / per_step)
