"""Evaluation on a fixed set: its loss, exactly the training loss's definition, and greedy answers to its probes.

The loss is the summed cross-entropy of every token that carries loss (assistant replies and their end-of-turn
token for chat data; see :mod:`engine.tokenize`) divided by their number: the definition the training loop uses
(:func:`engine.loss.loss_sum`), over the same tokenisation and masks under the hero's chat template. Examples
are tokenised once per job (and kept while the set and tokenizer stay the same), cut at the set's own
``max_length`` so every job of a campaign evaluates on the same tokens whatever its own ``max_length``, and packed
best-fit into rows of that length, attention kept per example as in training.

A forward over a batch of eval rows holds about as many tokens as a training micro-batch
(:func:`rows_per_batch`), so an evaluation needs no more memory than a training step (less: no gradients).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from config.schema import TrainerConfig
from engine.chat_turns import ChatOptions
from engine.errors import DatasetInvalid, EvalSetInvalid, EvalSetTooLarge
from engine.eval_plan import EvalPoint, EvalSpec, ProbeAnswer
from engine.formats import DatasetError, Example, read_examples
from engine.generate import decode, greedy_generate, prompt_ids, stop_token_ids
from engine.loss import loss_sum
from engine.packing import Batch, pack_best_fit, unpacked_rows
from engine.tokenize import TokenizedExample, tokenize_examples

logger = logging.getLogger(__name__)

# make_batch(rows, examples) -> a Batch with the attention layout of the run (the trainer's collate)
MakeBatch = Callable[[Sequence[Sequence[int]], Sequence[TokenizedExample]], Batch]


@dataclass(frozen=True)
class EvalData:
    """A fixed eval set as token ids, packed into rows of ``row_length``."""

    examples: list[TokenizedExample]
    rows: list[list[int]]
    row_length: int
    pad_id: int
    num_read: int  # examples in the file
    num_truncated: int
    num_dropped: int  # no loss token within row_length: not evaluated

    @property
    def num_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    @property
    def num_loss_tokens(self) -> int:
        return sum(e.num_loss_tokens for e in self.examples)


def prepare_eval_data(
    examples: Sequence[Example],
    tokenizer,
    *,
    max_length: int,
    chat: ChatOptions | None = None,
    source: str = "",
    packing: bool = True,
) -> EvalData:
    """Tokenise and pack an eval set.

    Raises:
        EvalSetInvalid: the chat template rejects a line (``FILE:LINE``), or no example keeps a loss token.
        ChatTemplateError: the hero's chat template is broken.
    """
    try:
        tokenized = tokenize_examples(examples, tokenizer, max_length, chat=chat, source=source)
    except DatasetInvalid as exc:
        raise EvalSetInvalid(f"eval set: {exc}") from None
    kept = tokenized.examples
    if not kept:
        raise EvalSetInvalid(
            f"eval set {source or ''}: none of its {len(examples)} examples has a token to learn within "
            f"max_length={max_length}; set the eval set again with a larger --max-length or shorter prompts"
        )
    lengths = [len(e) for e in kept]
    rows = pack_best_fit(lengths, max_length) if packing else unpacked_rows(len(kept))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        pad_id = eos if eos is not None else 0
    return EvalData(kept, rows, max_length, pad_id, len(examples), tokenized.num_truncated, tokenized.num_dropped)


def read_eval_examples(path: str | os.PathLike) -> list[Example]:
    """The examples of a stored eval set or probes file (validated when it was set)."""
    try:
        return read_examples(path)
    except DatasetError as exc:
        raise EvalSetInvalid(f"eval set: {exc}") from None


def rows_per_batch(batch_size: int, train_length: int, eval_length: int) -> int:
    """Eval rows per forward: about the tokens of one training micro-batch (``batch_size`` rows of ``train_length``),
    at least one row."""
    return max(1, batch_size * train_length // max(1, eval_length))


def loss_over(model, data_rows: Sequence[Sequence[int]], examples: Sequence[TokenizedExample], *, per_batch: int,
              make_batch: MakeBatch, device: torch.device, autocast, loss_fn=loss_sum) -> tuple[float, int]:
    """``(summed loss, loss tokens)`` over ``data_rows``, ``per_batch`` rows a forward, without gradients.

    The model is in eval mode meanwhile and goes back to the mode it had. ``loss_fn(model, batch)`` is
    :func:`engine.loss.loss_sum`, or a data-parallel rank's (through its DDP/FSDP wrapper).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for i in range(0, len(data_rows), per_batch):
                batch = make_batch(data_rows[i : i + per_batch], examples).to(device)
                with autocast:
                    total += loss_fn(model, batch).double()
                count += batch.num_loss_tokens
    finally:
        model.train(was_training)
    return total.item(), count


class Evaluator:
    """One job's fixed evaluation: the set tokenised once, then its loss and the probes' answers at any step.

    Args:
        spec: what to evaluate.
        data: the set, tokenised (:func:`prepare_eval_data`).
        tokenizer: the hero's tokenizer (Hugging Face fast tokenizer or ChatTokenizer).
        chat: the hero's chat options.
    """

    def __init__(self, spec: EvalSpec, data: EvalData, tokenizer, chat: ChatOptions | None = None):
        self.spec, self.data, self.tokenizer = spec, data, tokenizer
        self.probes = [prompt_ids(tokenizer, p, chat, max_tokens=spec.max_length) for p in spec.probes]
        self.stop_ids = stop_token_ids(tokenizer) if spec.probes else []

    @classmethod
    def build(cls, spec: EvalSpec, tokenizer, chat: ChatOptions | None = None, *, packing: bool = True) -> Evaluator:
        """Read, tokenise and check an eval set against its budget.

        Raises:
            EvalSetInvalid: see :func:`prepare_eval_data`.
            EvalSetTooLarge: more tokens than ``spec.max_tokens``.
        """
        examples = read_eval_examples(spec.dataset_path)
        data = prepare_eval_data(examples, tokenizer, max_length=spec.max_length, chat=chat,
                                 source=spec.dataset_path, packing=packing)
        check_budget(data, spec)
        return cls(spec, data, tokenizer, chat)

    def evaluate(self, model, step: int, *, make_batch: MakeBatch, per_batch: int, device: torch.device,
                 autocast, loss_fn=loss_sum, full_weights=None) -> EvalPoint:
        """Evaluate ``model`` (the weights of global step ``step``): the set's loss, then every probe's answer.

        ``loss_fn`` as in :func:`loss_over`; ``full_weights()``, when given, is a context manager under which
        ``model`` holds all its weights (a sharded rank's: :meth:`engine.data_parallel.DataParallel.full_weights`).
        """
        started = time.perf_counter()
        total, count = loss_over(model, self.data.rows, self.data.examples, per_batch=per_batch,
                                 make_batch=make_batch, device=device, autocast=autocast, loss_fn=loss_fn)
        with full_weights() if full_weights is not None else contextlib.nullcontext():
            answers = self.answer(model, device)
        return EvalPoint(step=step, loss=total / count, num_examples=len(self.data.examples), num_loss_tokens=count,
                         seconds=time.perf_counter() - started, eval_set=self.spec.name, answers=tuple(answers))

    def answer(self, model, device: torch.device) -> list[ProbeAnswer]:
        """Greedy answers to the probes (see :mod:`engine.generate`)."""
        generated = greedy_generate(model, self.probes, max_new_tokens=self.spec.max_new_tokens,
                                    stop_ids=self.stop_ids, pad_id=self.data.pad_id, seed=self.spec.seed,
                                    device=device)
        return [ProbeAnswer(i, decode(self.tokenizer, g.ids), len(g.ids), g.finished)
                for i, g in enumerate(generated)]


# ------------------------------------------------------------------------------------ outside a training run


def load_eval_model(model_path: str, checkpoint: str | os.PathLike | None, device: torch.device):
    """The weights of ``checkpoint`` (None: the base weights in ``model_path``), in eval mode on ``device``, as
    training saw them: a LoRA/QLoRA checkpoint's adapter over its base, a full one whole.

    Returns:
        ``(model, config)``: the config the checkpoint was trained with (the defaults for base weights).

    Raises:
        ModelLoadError, CheckpointError, FinetuneUnsupported.
    """
    from engine.adapters import load_kwargs, prepare_model, weights_source
    from engine.checkpoint import read_checkpoint_state
    from engine.model import load_model

    config = TrainerConfig()
    if checkpoint is not None:
        config = _trained_config(read_checkpoint_state(Path(checkpoint)).get("config") or {})
    if checkpoint is None:
        model = load_model(Path(model_path)).to(device)
    else:
        source = weights_source(model_path, checkpoint, config.finetune)
        model = prepare_model(load_model(source, **load_kwargs(config, device)), config, device, checkpoint)
    model.eval()
    return model, config


def evaluate_model(model, tokenizer, spec: EvalSpec, *, step: int, device: torch.device, chat: ChatOptions | None,
                   precision: str = "auto", rows: int = 4) -> tuple[EvalPoint, EvalData]:
    """Evaluate a loaded model (:func:`load_eval_model`) on ``spec`` as a worker does: the same tokenisation, masks,
    document attention and loss, ``rows`` rows of ``spec.max_length`` a forward, then the probes' answers.

    Raises:
        EvalSetInvalid, EvalSetTooLarge (when ``spec.max_tokens`` is set), AttentionConfigError.
    """
    from engine.attention import choose_path, install
    from engine.model import autocast_for

    path = choose_path("auto", device, attention_dropout=float(getattr(model.config, "attention_dropout", 0) or 0))
    packed = install(model, packed=False)  # True when document attention is on: rows may then be packed
    evaluator = Evaluator.build(spec, tokenizer, chat, packing=packed)
    make_batch = batch_maker(evaluator.data.pad_id, path if packed else None)
    point = evaluator.evaluate(model, step, make_batch=make_batch, per_batch=rows, device=device,
                               autocast=autocast_for(device, precision))
    return point, evaluator.data


def batch_maker(pad_id: int, path, length: int | None = None, num_rows: int | None = None) -> MakeBatch:
    """A :data:`MakeBatch` that collates rows and gives the batch the layout of attention ``path`` (None: the
    model's own attention, unpacked rows)."""
    from engine.attention import AttentionPath, layout_for
    from engine.packing import collate

    def make(rows, examples) -> Batch:
        batch = collate(rows, examples, pad_id, length, num_rows)
        if path is not None:
            batch.layout = layout_for(path, batch.documents, batch.input_ids.shape[1], batch.example_index,
                                      compiled=path is AttentionPath.FLEX)
        return batch

    return make


def _trained_config(values: dict) -> TrainerConfig:
    """The TrainerConfig stored in a checkpoint, keys this version does not know left out."""
    from config.schema import field_specs

    known = field_specs()
    flat = {f"{g}.{k}": v for g, group in values.items() if isinstance(group, dict) for k, v in group.items()}
    return TrainerConfig.from_flat({k: v for k, v in flat.items() if k in known and not k.startswith("queue.")})


def check_budget(data: EvalData, spec: EvalSpec) -> None:
    """Raise EvalSetTooLarge when the set has more tokens than ``spec.max_tokens`` (0: no budget)."""
    if spec.max_tokens and data.num_tokens > spec.max_tokens:
        raise EvalSetTooLarge(
            f"the campaign's eval set ({spec.dataset_path}) has {data.num_tokens:,} tokens at max_length "
            f"{spec.max_length}; hyperparams.eval_max_tokens allows {spec.max_tokens:,} per evaluation. Raise it "
            f"(--set eval_max_tokens={data.num_tokens}) or set a smaller eval set (python -m campaigns eval-set)"
        )
