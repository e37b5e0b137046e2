"""Examples to token ids and next-token targets, with the loss only where the model should learn to write.

* ``messages``: rendered with the tokenizer's chat template; loss on every assistant turn, including the token
  that closes it (``<|im_end|>`` in ChatML), and on nothing else.
* ``prompt_response``: rendered as one user turn and one assistant turn; loss on the assistant turn.
* ``text``: the plain text plus the end-of-sequence token; loss on every token.

Which characters belong to an assistant turn is found by rendering the conversation's prefixes: the turn starts
where ``render(messages[:i], add_generation_prompt=True)`` ends and stops where ``render(messages[:i + 1])`` ends
(trailing whitespace, the separator between turns, is left out). This works for any template whose renderings of
prefixes are prefixes of the whole rendering; where a template breaks that, the common prefix is used. Tokens are
then matched to characters through the fast tokenizer's offsets, so the whole conversation is tokenised once.

Targets are stored already shifted: ``targets[t]`` is the token that position ``t`` must predict, or
:data:`IGNORE_INDEX`. The last position of an example never has a target, so when examples are packed side by
side, no example's first token is ever predicted from the previous example.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import DatasetInvalid, ModelLoadError
from engine.formats import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the target of a position that carries no loss (torch's cross_entropy default)


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids and shifted targets, both at most max_length long."""

    input_ids: list[int]
    targets: list[int]  # targets[t]: the id position t predicts, or IGNORE_INDEX
    line: int  # the example's line in its dataset file
    truncated: bool  # it was longer than max_length and was cut

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE_INDEX)


@dataclass(frozen=True)
class TokenizedSet:
    """The examples that kept at least one loss token, and what happened to the others."""

    examples: list[TokenizedExample]
    num_truncated: int  # kept, but cut at max_length
    num_dropped: int  # every loss token fell beyond max_length: not trained on at all


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int) -> TokenizedSet:
    """Tokenise ``examples`` for training.

    Args:
        examples: validated examples, all of one format.
        tokenizer: a fast Hugging Face tokenizer; a chat template is needed for "messages" and "prompt_response".
        max_length: examples are cut to this many tokens.

    Returns:
        The kept examples in input order, with the counts of truncated and dropped ones.

    Raises:
        ModelLoadError: the tokenizer is not a fast one, or it has no chat template for chat formats.
        DatasetInvalid: the chat template fails to render an example (the error names its line).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            "the model's tokenizer is not a fast (Rust) tokenizer; the engine needs its offsets "
            "to find assistant tokens. Ship a tokenizer.json with the model"
        )
    chat = [e for e in examples if e.format != "text"]
    texts = [e for e in examples if e.format == "text"]
    tokenized: dict[int, tuple[list[int], list[bool]]] = {}
    if chat:
        for i, ids_mask in zip(_indices(examples, "chat"), _tokenize_chat(chat, tokenizer)):
            tokenized[i] = ids_mask
    if texts:
        for i, ids_mask in zip(_indices(examples, "text"), _tokenize_text(texts, tokenizer)):
            tokenized[i] = ids_mask

    kept: list[TokenizedExample] = []
    num_truncated = num_dropped = 0
    for i, example in enumerate(examples):
        ids, mask = tokenized[i]
        truncated = len(ids) > max_length
        ids, mask = ids[:max_length], mask[:max_length]
        # Shift: position t predicts token t + 1, and carries loss only when token t + 1 is one to learn.
        targets = [nxt if learn else IGNORE_INDEX for nxt, learn in zip(ids[1:], mask[1:])]
        targets.append(IGNORE_INDEX)
        if all(t == IGNORE_INDEX for t in targets):
            num_dropped += 1
            logger.debug("line %d: dropped, no loss token within max_length=%d", example.line, max_length)
            continue
        num_truncated += truncated
        kept.append(TokenizedExample(ids, targets, example.line, truncated))
    return TokenizedSet(kept, num_truncated, num_dropped)


def _indices(examples: Sequence[Example], kind: str) -> list[int]:
    return [i for i, e in enumerate(examples) if (e.format == "text") == (kind == "text")]


def _tokenize_text(examples: Sequence[Example], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Plain text and the end-of-sequence token, every token learnt."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer([e.text for e in examples], add_special_tokens=True)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append((ids, [True] * len(ids)))
    return out


def _tokenize_chat(examples: Sequence[Example], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Chat-template rendering, one batched tokenisation, assistant spans mapped to tokens by offsets."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            "the model's tokenizer has no chat template, which 'messages' and 'prompt_response' "
            "datasets need; add one (chat_template.jinja) to the model directory"
        )
    rendered = [render_with_spans(_conversation(e), tokenizer, e.line) for e in examples]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        starts = [s for s, _ in offsets]
        ends = [e for _, e in offsets]
        mask = [False] * len(ids)
        for span_start, span_end in spans:
            # Every token that overlaps the span: its end is past the span's start and its start before its end.
            for t in range(bisect_right(ends, span_start), bisect_left(starts, span_end)):
                mask[t] = True
        out.append((list(ids), mask))
    return out


def _conversation(example: Example) -> list[dict[str, str]]:
    if example.format == "prompt_response":
        return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]
    return [{"role": role, "content": content} for role, content in example.messages]


def render_with_spans(messages: list[dict[str, str]], tokenizer, line: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; return the text and each assistant turn's character span.

    Raises:
        DatasetInvalid: the template raised on this conversation or one of its prefixes.
    """

    def render(prefix: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a template error is the data's (or template's) problem
            raise DatasetInvalid(
                f"line {line}: the model's chat template cannot render this conversation "
                f"({type(exc).__name__}: {exc}); fix the roles or order of its messages"
            ) from None

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix_length(render(messages[:i], True), full) if i else 0
        end = _common_prefix_length(render(messages[: i + 1], False), full)
        # The separator after the closing token (a newline in ChatML) starts the next turn; it is not learnt.
        end = start + len(full[start:end].rstrip())
        if end > start:
            spans.append((start, end))
    return full, spans


def _common_prefix_length(a: str, b: str) -> int:
    if b.startswith(a):  # the usual case, at C speed
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
