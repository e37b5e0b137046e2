"""What a job will train, counted once at enqueue: its tokens after truncation at ``max_length``, its steps, and
the tokens all its steps train (what an ETA divides by a measured speed). Stored with the job (``Job.workload``).

The dataset is tokenised with the hero's tokenizer and chat template, as training does
(:func:`engine.truncation.truncation_report`, which needs neither torch nor transformers). A file up to
:data:`FULL_COUNT_BYTES` is counted whole; a bigger one on an evenly spread sample of its lines (about
:data:`SAMPLE_BYTES`), scaled up and marked as an estimate, so enqueue stays fast whatever the file. Only what
``max_length`` can use of a line is tokenised, so a one-line 30 MB file costs what a short line costs and plans at
the ``max_length`` tokens it trains.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.batching import for_ranks
from engine.batches import DataOrder, job_steps
from engine.formats import Example, parse_bytes, read_examples
from engine.truncation import TruncationReport, truncation_report
from jobs.job_plan import JobPlan

logger = logging.getLogger(__name__)

FULL_COUNT_BYTES = 8 * 1024 * 1024  # files up to this size are tokenised whole: exact figures
SAMPLE_BYTES = 2 * 1024 * 1024  # bigger files: about this much of their lines, evenly spread


@dataclass(frozen=True)
class Workload:
    """What one job trains, as counted at enqueue.

    Attributes:
        truncation: what ``max_length`` cuts (its ``message`` is the line enqueue prints).
        data_tokens: tokens of the dataset after the cut (one pass over it, validation examples included).
        train_tokens: tokens all the job's steps train (``epochs`` passes, or ``max_steps`` steps, over the
            training rows): the figure ETAs are planned on.
        steps: the job's optimizer steps on one GPU (``max_steps``, or what ``epochs`` take).
        counted: tokenised with the hero's tokenizer; False: estimated from the text's size (the tokenizer is not
            on this machine yet).
        exact: counted on every line (not a sample) and every text whole.
    """

    truncation: TruncationReport
    data_tokens: int
    train_tokens: int
    steps: int
    counted: bool
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["truncation"] = self.truncation.to_dict()
        return data


def estimate_workload(path: str | os.PathLike, num_examples: int, plan: JobPlan, source: str = "") -> Workload:
    """Count what ``path`` (already validated) trains under ``plan``.

    Args:
        num_examples: the file's examples (from its validation).
        source: the file's name for errors.

    Raises:
        DatasetInvalid: the hero's chat template rejects a line, or a reply cannot be located (``FILE:LINE``).
        ChatTemplateError, ModelLoadError: the hero's tokenizer or template is broken.
    """
    hp = plan.config.hyperparams
    examples, sampled = _examples(Path(path), source or str(path))
    report = truncation_report(examples, _tokenizer_dir(plan.model_path), hp.max_length,
                               chat=plan.hero.chat_options, context_length=plan.hero.context_length, source=source)
    if sampled:
        report = _scaled(report, num_examples / max(len(examples), 1))
    steps, train_tokens = _steps_and_tokens(report, plan)
    return Workload(report, report.tokens_kept, train_tokens, steps, report.counted, report.exact and not sampled)


def _examples(path: Path, source: str) -> tuple[list[Example], bool]:
    """Every example of a small file; an evenly spread sample of a big one (True)."""
    size = path.stat().st_size
    if size <= FULL_COUNT_BYTES:
        return read_examples(path, source), False
    every = math.ceil(size / SAMPLE_BYTES)
    examples: list[Example] = []
    with open(path, "rb") as f:
        n = 0
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if n % every == 0:
                [example] = parse_bytes(raw, source)
                examples.append(dataclasses.replace(example, line=number))
            n += 1
    return examples, True


def _tokenizer_dir(model_path: str) -> Path | None:
    path = Path(model_path)
    return path if path.is_dir() else None


def _scaled(report: TruncationReport, factor: float) -> TruncationReport:
    """A sample's report scaled to the whole file (an estimate)."""
    return dataclasses.replace(
        report, num_examples=round(report.num_examples * factor), num_over=round(report.num_over * factor),
        num_dropped=round(report.num_dropped * factor), tokens_cut=round(report.tokens_cut * factor),
        tokens_kept=round(report.tokens_kept * factor), exact=False)


def _steps_and_tokens(report: TruncationReport, plan: JobPlan) -> tuple[int, int]:
    """The job's optimizer steps and the tokens they train, on one GPU, from the counted data.

    Mirrors the engine's structure (engine.dataset, engine.batches): the examples that keep a reply, less the
    validation split; rows of ``max_length`` tokens when packing, else one row per example; ``job_steps`` of those
    rows. Packing fills rows best-fit, so rows are estimated as tokens / max_length.
    """
    hp = for_ranks(plan.config, 1).hyperparams
    kept = max(report.num_examples - report.num_dropped, 0)
    if kept == 0 or report.tokens_kept == 0:
        return 0, 0
    val = 0 if kept < 2 or hp.eval_fraction <= 0 or hp.eval_max_examples <= 0 else \
        min(hp.eval_max_examples, kept - 1, max(1, round(kept * hp.eval_fraction)))
    train_tokens = report.tokens_kept * (kept - val) / kept
    rows = math.ceil(train_tokens / hp.max_length) if plan.config.data.enable_packing else kept - val
    order = DataOrder(max(rows, 1), hp.batch_size, hp.seed, shuffle=False)
    steps = job_steps(order, hp)
    tokens_per_micro_batch = train_tokens / order.micro_batches_per_epoch
    return steps, round(steps * hp.gradient_accumulation_steps * tokens_per_micro_batch)
