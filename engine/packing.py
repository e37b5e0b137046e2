"""Packing: several examples side by side in one row of ``max_length`` tokens, none seeing another.

Rows are filled best-fit decreasing (longest example first, each into the fullest row it still fits), which is
deterministic and leaves a few percent of padding on SFT-like length mixes.

A packed row keeps its examples apart in two ways:

* attention: each batch says where every example lies in its row (:attr:`Batch.documents`), and
  :mod:`engine.attention` uses exactly that, so a token attends only to earlier tokens of its own example.
  Nothing is inferred from position ids (they restart at 0 for each example, which is what rotary embeddings
  need, and nothing more);
* targets are shifted per example before packing (see :mod:`engine.tokenize`), so an example's last position has
  no target and no example's first token is predicted from the one before it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine.attention import DocumentLayout
from engine.tokenize import IGNORE_INDEX, TokenizedExample


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens, best-fit decreasing.

    Returns:
        Rows of indices into ``lengths``; each row's indices in placement order. Deterministic: ties between equal
        lengths go by index.

    Raises:
        ValueError: an example is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the first entry >= n is the best fit
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        k = bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
            rows[row].append(i)
        else:
            space, row = capacity, len(rows)
            rows.append([i])
        if space - n > 0:
            insort(free, (space - n, row))
    return rows


def unpacked_rows(num_examples: int) -> list[list[int]]:
    """One example per row (packing off)."""
    return [[i] for i in range(num_examples)]


@dataclass
class Batch:
    """One micro-batch: ``rows x length`` tokens, padding at the end of each row.

    ``loss_positions`` (flat indices into ``rows * length``) and ``loss_targets`` list the positions that carry
    loss, computed on the host so the device never has to look for them (a boolean mask index would sync).
    """

    input_ids: torch.Tensor  # (rows, length) int64
    position_ids: torch.Tensor  # (rows, length) int64, restarting at 0 for each example; padding continues the last
    example_index: torch.Tensor  # (rows, length) int64, the example each token belongs to, -1 on padding
    loss_positions: torch.Tensor  # (n,) int64
    loss_targets: torch.Tensor  # (n,) int64
    loss_examples: torch.Tensor  # (n,) int64, the example of each loss position
    num_tokens: int  # non-padding tokens
    num_loss_tokens: int
    documents: tuple[tuple[int, ...], ...] = ()  # per row: the length of each example, in row order
    layout: DocumentLayout | None = None  # what the attention path needs (engine.attention.layout_for)

    _TENSORS = ("input_ids", "position_ids", "example_index", "loss_positions", "loss_targets", "loss_examples")

    def to(self, device: torch.device) -> Batch:
        """On ``device``; copies from pinned memory are asynchronous (the host does not wait for them)."""
        if device.type == "cpu":
            return self
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self._TENSORS}
        layout = self.layout.to(device, non_blocking=True) if self.layout is not None else None
        return replace(self, **moved, layout=layout)

    def pin_memory(self) -> Batch:
        """In page-locked host memory, so that :meth:`to` can copy it while the GPU computes."""
        pinned = {name: getattr(self, name).pin_memory() for name in self._TENSORS}
        layout = self.layout.pin_memory() if self.layout is not None else None
        return replace(self, **pinned, layout=layout)


def collate(
    rows: Sequence[Sequence[int]],
    examples: Sequence[TokenizedExample],
    pad_id: int,
    length: int | None = None,
    num_rows: int | None = None,
) -> Batch:
    """Build a micro-batch from rows of example indices.

    Args:
        rows: each row's example indices into ``examples``.
        pad_id: the id that fills each row's end (it carries no loss and sees only other padding).
        length: the row length; by default the longest row of this batch.
        num_rows: add rows of padding up to this many. With ``length``, keeps shapes static (for torch.compile).
    """
    if num_rows is not None and num_rows > len(rows):
        rows = [*rows, *([()] * (num_rows - len(rows)))]
    row_lengths = [sum(len(examples[i]) for i in row) for row in rows]
    width = length if length is not None else max(row_lengths)
    ids: list[int] = []
    positions: list[int] = []
    owners: list[int] = []
    loss_positions: list[int] = []
    loss_targets: list[int] = []
    loss_examples: list[int] = []
    for r, row in enumerate(rows):
        offset = r * width
        for i in row:
            example = examples[i]
            n = len(example)
            ids.extend(example.input_ids)
            positions.extend(range(n))
            owners.extend([i] * n)
            for t, target in enumerate(example.targets):
                if target != IGNORE_INDEX:
                    loss_positions.append(offset + t)
                    loss_targets.append(target)
                    loss_examples.append(i)
            offset += n
        pad = width - row_lengths[r]
        ids.extend([pad_id] * pad)
        # Padding continues the last example's positions: a row of one example then reads as one sequence (a model
        # with its own attention then needs no mask at all: causal, and no real token sees the padding after it).
        last = len(examples[row[-1]]) if row else 0
        positions.extend(range(last, last + pad))
        owners.extend([-1] * pad)
    shape = (len(rows), width)
    documents = tuple(tuple(len(examples[i]) for i in row) for row in rows)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.long).view(shape),
        position_ids=torch.tensor(positions, dtype=torch.long).view(shape),
        example_index=torch.tensor(owners, dtype=torch.long).view(shape),
        loss_positions=torch.tensor(loss_positions, dtype=torch.long),
        loss_targets=torch.tensor(loss_targets, dtype=torch.long),
        loss_examples=torch.tensor(loss_examples, dtype=torch.long),
        num_tokens=sum(row_lengths),
        num_loss_tokens=len(loss_positions),
        documents=documents,
    )
