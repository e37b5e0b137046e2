"""How much of a dataset a hero's ``max_length`` would cut, counted before the job runs, as training counts it.

Enqueue and ``--plan`` call :func:`truncation_report`; it needs neither torch nor transformers (the tokenizer and
its chat template load with ``tokenizers`` and ``jinja2``, see :mod:`engine.chat_tokenizer`), and it tokenises
through :func:`engine.tokenize.tokenize_examples`, the function training uses, so the figures are the ones the job
will log. When the hero's model is not on this machine yet (the tiny hero is built on first use, a hub hero may
not be downloaded), the figures are estimated from the text's size and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.chat_tokenizer import TOKENIZER_FILE, load_chat_tokenizer
from engine.chat_turns import ChatOptions
from engine.formats import Example, estimate_tokens
from engine.tokenize import tokenize_examples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TruncationReport:
    """What ``max_length`` does to a dataset.

    Attributes:
        num_over: examples longer than ``max_length`` (their tokens beyond it are not trained on).
        num_dropped: of those, the examples with no reply starting within ``max_length``: not trained on at all.
        tokens_cut: tokens beyond ``max_length``, summed.
        counted: True when counted with the hero's tokenizer; False when estimated without it.
        exact: counted, and every text was tokenised whole (a text longer than
            :func:`engine.tokenize.cut_chars` is tokenised only as far as training needs; its tokens beyond are
            estimated from those).
        suggested_max_length: a ``max_length`` that fits the longest example (a power of two, at most the
            model's context length when known), or None when nothing is cut.
        tokens_kept: tokens left after the cut, summed over the examples that keep a reply: what one pass over the
            dataset trains on (validation examples included).
    """

    max_length: int
    num_examples: int
    num_over: int
    num_dropped: int
    tokens_cut: int
    counted: bool
    exact: bool
    suggested_max_length: int | None
    tokens_kept: int = 0

    @property
    def message(self) -> str:
        """One line for a person: what is cut and how to avoid it."""
        about = "" if self.exact else "about "
        if not self.num_over:
            text = f"no example exceeds max_length {self.max_length}"
            return text if self.counted else text + " (estimated: the hero's tokenizer is not on this machine yet)"
        parts = [f"{about}{self.tokens_cut:,} tokens cut"]
        if self.num_dropped:
            parts.append(f"{self.num_dropped:,} not trained on at all: no reply starts within it")
        if not self.counted:
            parts.append("estimated: the hero's tokenizer is not on this machine yet")
        fix = "shorten them"
        if self.suggested_max_length and self.suggested_max_length > self.max_length:
            fix = f"raise it with --set max_length={self.suggested_max_length} or shorten them"
        return (
            f"{about}{self.num_over:,} of {self.num_examples:,} examples exceed max_length {self.max_length} "
            f"({'; '.join(parts)}); {fix}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def truncation_report(
    examples: Sequence[Example],
    tokenizer_dir: str | Path | None,
    max_length: int,
    *,
    chat: ChatOptions | None = None,
    context_length: int | None = None,
    source: str = "",
    max_chars: int | None = None,
) -> TruncationReport:
    """Count the examples and tokens ``max_length`` cuts from ``examples``.

    Args:
        examples: a validated dataset (``engine.formats.read_examples``).
        tokenizer_dir: the hero's model directory (``tokenizer.json`` and the chat template); None or a directory
            without ``tokenizer.json`` gives an estimate.
        max_length: the job's ``hyperparams.max_length``.
        chat: the hero's chat options (think blocks change the count).
        context_length: the model's context length, the most the suggested ``max_length`` may be.
        source: the dataset's name for errors (``data.jsonl:12: ...``).
        max_chars: count on an evenly spread sample of about this many characters of content when the dataset
            has more, and scale up (the figures are then estimates: ``exact`` is False). None counts everything:
            about 1 s per 2 MB of text on one busy CPU core.

    Returns:
        The report; its ``message`` is the line to show.

    Raises:
        DatasetInvalid: the chat template rejects a line, or a reply cannot be located (named by file and line).
        ChatTemplateError: the hero's chat template is broken.
        ModelLoadError: ``tokenizer.json`` exists but cannot be loaded.
    """
    if tokenizer_dir is None or not (Path(tokenizer_dir) / TOKENIZER_FILE).is_file():
        return _estimate(examples, max_length, context_length)
    tokenizer = load_chat_tokenizer(tokenizer_dir)
    sample = _sample(examples, max_chars)
    tokenized = tokenize_examples(sample, tokenizer, max_length, chat=chat, source=source)
    scale = len(examples) / len(sample)
    num_over = round((tokenized.num_truncated + tokenized.num_dropped) * scale)
    return TruncationReport(
        max_length=max_length,
        num_examples=len(examples),
        num_over=num_over,
        num_dropped=round(tokenized.num_dropped * scale),
        tokens_cut=round(tokenized.num_tokens_cut * scale),
        counted=True,
        exact=tokenized.tokens_cut_exact and len(sample) == len(examples),
        suggested_max_length=_suggest(tokenized.longest, context_length) if num_over else None,
        tokens_kept=round(sum(len(e) for e in tokenized.examples) * scale),
    )


def _sample(examples: Sequence[Example], max_chars: int | None) -> Sequence[Example]:
    """Every k-th example, k chosen so that about ``max_chars`` characters of content are left (all if fewer)."""
    if max_chars is None:
        return examples
    total = sum(e.num_chars() for e in examples)
    if total <= max_chars:
        return examples
    return examples[:: -(-total // max_chars)]


def _estimate(examples: Sequence[Example], max_length: int, context_length: int | None) -> TruncationReport:
    lengths = [estimate_tokens([e]) for e in examples]
    over = [n for n in lengths if n > max_length]
    return TruncationReport(
        max_length=max_length,
        num_examples=len(examples),
        num_over=len(over),
        num_dropped=0,
        tokens_cut=sum(n - max_length for n in over),
        counted=False,
        exact=False,
        suggested_max_length=_suggest(max(over), context_length) if over else None,
        tokens_kept=sum(min(n, max_length) for n in lengths),
    )


def _suggest(longest: int, context_length: int | None) -> int:
    size = 1 << max(0, longest - 1).bit_length()
    return min(size, context_length) if context_length else size
