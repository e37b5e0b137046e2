"""A dataset made ready to train on: split, tokenised and packed, once, before (or beside) training.

:func:`prepare_dataset` is pure given its inputs, so the engine can run it ahead of time on a background thread
for the next job and reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat_turns import ChatOptions
from engine.errors import DatasetInvalid
from engine.formats import Example
from engine.packing import pack_best_fit, unpacked_rows
from engine.tokenize import TokenizedExample, tokenize_examples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedDataset:
    """Train and validation examples as token ids, grouped into rows of at most ``row_length`` tokens."""

    train: list[TokenizedExample]
    val: list[TokenizedExample]
    rows: list[list[int]]  # train rows: indices into ``train``
    val_rows: list[list[int]]  # indices into ``val``
    row_length: int
    packed: bool
    pad_id: int
    num_examples: int  # examples read, before any was dropped
    num_truncated: int
    num_dropped: int
    fingerprint: str  # identifies the train tokens and their rows: a same-run resume checks its data is unchanged

    @property
    def num_train_tokens(self) -> int:
        return sum(len(e) for e in self.train)


def split_sizes(n: int, eval_fraction: float, eval_max_examples: int) -> int:
    """How many of ``n`` examples validate: ``round(n * eval_fraction)``, at least 1 when ``n >= 2`` and the
    fraction is positive, at most ``eval_max_examples`` and at most ``n - 1``."""
    if n < 2 or eval_fraction <= 0 or eval_max_examples <= 0:
        return 0
    return min(eval_max_examples, n - 1, max(1, round(n * eval_fraction)))


def prepare_dataset(
    examples: Sequence[Example],
    tokenizer,
    *,
    max_length: int,
    packing: bool,
    eval_fraction: float,
    eval_max_examples: int,
    seed: int,
    chat: ChatOptions | None = None,
    source: str = "",
) -> PreparedDataset:
    """Tokenise, split and pack ``examples``.

    The validation examples are drawn from the kept examples with ``random.Random(seed)``, so the split is the
    same every time for the same data and seed.

    ``chat`` (the hero's chat options) and ``source`` (the file, for ``FILE:LINE`` in errors) go to
    :func:`engine.tokenize.tokenize_examples`.

    Raises:
        DatasetInvalid: no example keeps a loss token within ``max_length``, or the chat template rejects a line.
        ChatTemplateError: the hero's chat template is broken.
    """
    tokenized = tokenize_examples(examples, tokenizer, max_length, chat=chat, source=source)
    kept = tokenized.examples
    if not kept:
        raise DatasetInvalid(
            f"all {len(examples)} examples were dropped: none has a token to learn within "
            f"max_length={max_length} (every assistant reply starts beyond it); raise "
            "hyperparams.max_length or shorten the prompts"
        )
    n_val = split_sizes(len(kept), eval_fraction, eval_max_examples)
    val_index = set(random.Random(seed).sample(range(len(kept)), n_val))
    train = [e for i, e in enumerate(kept) if i not in val_index]
    val = [e for i, e in enumerate(kept) if i in val_index]
    if packing:
        rows = pack_best_fit([len(e) for e in train], max_length)
        val_rows = pack_best_fit([len(e) for e in val], max_length)
    else:
        rows, val_rows = unpacked_rows(len(train)), unpacked_rows(len(val))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    prepared = PreparedDataset(
        train=train,
        val=val,
        rows=rows,
        val_rows=val_rows,
        row_length=max_length,
        packed=packing,
        pad_id=pad_id,
        num_examples=len(examples),
        num_truncated=tokenized.num_truncated,
        num_dropped=tokenized.num_dropped,
        fingerprint=_fingerprint(train, rows, max_length),
    )
    logger.info(
        "prepared %d examples: %d train in %d rows, %d validation, %d truncated, %d dropped, %d tokens",
        len(examples),
        len(train),
        len(rows),
        len(val),
        prepared.num_truncated,
        prepared.num_dropped,
        prepared.num_train_tokens,
    )
    return prepared


def _fingerprint(train: Sequence[TokenizedExample], rows: Sequence[Sequence[int]], row_length: int) -> str:
    digest = hashlib.sha256(f"{row_length}:{len(train)}:{len(rows)}".encode())
    for example in train:
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.targets).tobytes())
    for row in rows:
        digest.update(array("q", row).tobytes() + b"|")
    return "sha256:" + digest.hexdigest()[:16]
