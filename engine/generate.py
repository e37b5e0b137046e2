"""Answers to fixed prompts: greedy decoding with the KV cache, through the hero's chat template.

The same function serves a worker's periodic evaluation and ``python -m campaigns compare``, so an answer stored
at a step is what the checkpoint of that step gives again (same prompt, same seed, same code):

* the prompt is rendered by the hero's chat template with the generation prompt, as at inference. With
  ``chat.thinking: keep`` (the default) it is rendered with ``enable_thinking=False``: a Qwen3-style template then
  ends it with the empty think block training kept in the input, so the model answers as it was trained to;
  with ``strip`` the plain generation prompt is used, as training cut the block;
* decoding is greedy (argmax at every step), one prompt at a time (no padding, so no batch effects), at most
  ``max_new_tokens`` tokens, stopping at the tokenizer's end-of-sequence token or the template's end-of-turn marker;
* every random generator is seeded inside a forked state: generation never moves the training run's RNG, and
  a stochastic layer (none is active in eval mode) could not make two runs differ.

The model trains with Guild's document attention (:mod:`engine.attention`), which needs a layout that
``generate`` does not pass: attention is switched to PyTorch's SDPA for the generation and back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from engine.chat_tokenizer import ChatTokenizer, as_chat_tokenizer
from engine.chat_turns import ChatOptions, template_markers
from engine.eval_plan import Probe

logger = logging.getLogger(__name__)

GENERATION_ATTENTION = "sdpa"


@dataclass(frozen=True)
class Generated:
    """One answer: its token ids (the stop token included when one came) and whether the model ended its turn."""

    ids: tuple[int, ...]
    finished: bool


def prompt_ids(tokenizer, probe: Probe, chat: ChatOptions | None = None, max_tokens: int | None = None) -> list[int]:
    """The token ids of ``probe`` rendered with the generation prompt (see the module's notes on think blocks).

    Args:
        max_tokens: keep only the last this many tokens (the end of a long conversation is what is answered).
    """
    chat_tok = as_chat_tokenizer(tokenizer)
    options = chat or ChatOptions()
    extra = {"enable_thinking": False} if options.thinking == "keep" else {}
    text = chat_tok.render(probe.conversation(), add_generation_prompt=True, **extra)
    ids = list(chat_tok.encode_batch([text], add_special_tokens=False)[0].ids)
    return ids[-max_tokens:] if max_tokens and len(ids) > max_tokens else ids


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: end-of-sequence, and the template's end-of-turn marker when it is one token."""
    chat_tok = as_chat_tokenizer(tokenizer)
    stops = [chat_tok.eos_token_id] if chat_tok.eos_token_id is not None else []
    marker = template_markers(chat_tok).end_of_turn.strip()
    if marker:
        marker_id = chat_tok.backend.token_to_id(marker)
        if marker_id is not None and marker_id not in stops:
            stops.append(marker_id)
    return stops


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids, special tokens (the stop token) left out."""
    backend = tokenizer.backend if isinstance(tokenizer, ChatTokenizer) else as_chat_tokenizer(tokenizer).backend
    return backend.decode(list(ids), skip_special_tokens=True).strip()


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    seed: int,
    device: torch.device,
) -> list[Generated]:
    """Greedy answers to each prompt (token ids), one prompt at a time, KV cache on.

    The model is left in the mode (train/eval) and with the attention implementation it had.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
    )
    stops = set(stop_ids)
    answers: list[Generated] = []
    was_training = model.training
    fork_devices = [device] if device.type == "cuda" else []
    with _plain_attention(model), torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        torch.manual_seed(seed)
        model.eval()
        try:
            for ids in prompts:
                input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=config)
                new = [int(t) for t in out[0, input_ids.shape[1]:].tolist()]
                finished = bool(new) and new[-1] in stops
                answers.append(Generated(tuple(new), finished))
        finally:
            model.train(was_training)
    return answers


@contextlib.contextmanager
def _plain_attention(model) -> Iterator[None]:
    """SDPA attention (and eager execution of compiled layers) while generating; as it was afterwards."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    changed = before != GENERATION_ATTENTION
    if changed:
        _set_attention(model, GENERATION_ATTENTION)
    stance = getattr(torch.compiler, "set_stance", None)
    eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
    try:
        with eager:
            yield
    finally:
        if changed and before is not None:
            _set_attention(model, before)


def _set_attention(model, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:  # transformers before set_attn_implementation
        model.config._attn_implementation = implementation
