"""Examples to token ids and next-token targets, with the loss only where the model should learn to write.

* ``messages``: rendered with the hero's chat template; loss on every assistant turn, including the token that
  closes it (``<|im_end|>`` in ChatML), and on nothing else, under any template (see :mod:`engine.chat_turns`
  for how turns are located and what happens to think blocks).
* ``prompt_response``: rendered as one user turn and one assistant turn; loss on the assistant turn.
* ``text``: the plain text plus the end-of-sequence token; loss on every token.

All texts of a dataset go through one batched call of the Rust tokenizer, and assistant spans are mapped to tokens
through its character offsets.

**Bounded work.** Only the first ``max_length`` tokens of an example are trained on, so a text longer than
:func:`cut_chars` characters (64 Ki, or 12 a token for long max_lengths) is cut, at a space where there is one,
before it is tokenised: a 30 MB line costs what a line of some thousand tokens costs. The cut keeps
``_MARGIN_TOKENS`` tokens beyond ``max_length``, so the kept tokens are those of the whole text; where the cut text
still makes fewer tokens than that (long runs of characters that pack into few tokens), it is cut longer and
tokenised again. Whether an example is truncated is therefore exact; how many tokens a cut text would have made in
full is estimated (``tokens_cut_exact`` says so).

Targets are stored already shifted: ``targets[t]`` is the token that position ``t`` must predict, or
:data:`IGNORE_INDEX`. The last position of an example never has a target, so when examples are packed side by
side, no example's first token is ever predicted from the previous example.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat_tokenizer import ChatTokenizer, as_chat_tokenizer
from engine.chat_turns import ChatOptions, render_with_spans
from engine.formats import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the target of a position that carries no loss (torch's cross_entropy default)

_MARGIN_TOKENS = 64  # tokens kept beyond max_length when a long text is cut, so the cut never changes kept tokens
_CHARS_PER_TOKEN = 12  # the first cut: generous for text (3-5 characters a token); denser text is cut again
_MIN_CUT_CHARS = 65_536  # shorter texts are tokenised whole, so their tokens beyond max_length are counted exactly
_GROWTH = 4  # how much longer each further cut is

__all__ = ["IGNORE_INDEX", "TokenizedExample", "TokenizedSet", "cut_chars", "render_with_spans", "tokenize_examples"]


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
    num_tokens_cut: int = 0  # tokens beyond max_length, summed over kept and dropped examples
    tokens_cut_exact: bool = True  # False when a text was too long to tokenise whole (the count is then estimated)
    longest: int = 0  # tokens of the longest example before truncation (estimated like num_tokens_cut)


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]
    num_tokens: int  # of the whole text: exact, or estimated when the text was cut
    cut: bool  # the text was cut before tokenising


def cut_chars(max_length: int) -> int:
    """How many characters of a text are tokenised at first, for examples cut at ``max_length`` tokens."""
    return max(_MIN_CUT_CHARS, (max_length + _MARGIN_TOKENS) * _CHARS_PER_TOKEN)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    *,
    chat: ChatOptions | None = None,
    source: str = "",
) -> TokenizedSet:
    """Tokenise ``examples`` for training.

    Args:
        examples: validated examples, all of one format.
        tokenizer: a fast Hugging Face tokenizer or a :class:`~engine.chat_tokenizer.ChatTokenizer`; a chat template
            is needed for "messages" and "prompt_response".
        max_length: examples are cut to this many tokens.
        chat: how conversations are rendered (the hero's ``chat`` section); defaults to keeping think blocks.
        source: the dataset file, to name it in errors (``data.jsonl:12: ...``).

    Returns:
        The kept examples in input order, with the counts of truncated and dropped ones and of tokens cut.

    Raises:
        ModelLoadError: the tokenizer is not a fast one, or it has no chat template for chat formats.
        ChatTemplateError: the chat template is broken (fails for any conversation).
        DatasetInvalid: the chat template rejects an example, or one of its replies cannot be located (the error
            names the file and line).
    """
    backend = as_chat_tokenizer(tokenizer)
    chat_indices = [i for i, e in enumerate(examples) if e.format != "text"]
    text_indices = [i for i, e in enumerate(examples) if e.format == "text"]
    tokenized: dict[int, tuple[_Encoded, list[bool]]] = {}
    if chat_indices:
        chat_examples = [examples[i] for i in chat_indices]
        for i, item in zip(chat_indices, _tokenize_chat(chat_examples, backend, max_length, chat, source)):
            tokenized[i] = item
    if text_indices:
        text_examples = [examples[i] for i in text_indices]
        for i, item in zip(text_indices, _tokenize_text(text_examples, backend, max_length)):
            tokenized[i] = item

    kept: list[TokenizedExample] = []
    num_truncated = num_dropped = tokens_cut = longest = 0
    exact = True
    for i, example in enumerate(examples):
        encoded, mask = tokenized[i]
        truncated = encoded.num_tokens > max_length
        if truncated:
            tokens_cut += encoded.num_tokens - max_length
            exact = exact and not encoded.cut
        longest = max(longest, encoded.num_tokens)
        ids, mask = encoded.ids[:max_length], mask[:max_length]
        # Shift: position t predicts token t + 1, and carries loss only when token t + 1 is one to learn.
        targets = [nxt if learn else IGNORE_INDEX for nxt, learn in zip(ids[1:], mask[1:])]
        targets.append(IGNORE_INDEX)
        if all(t == IGNORE_INDEX for t in targets):
            num_dropped += 1
            logger.debug("line %d: dropped, no loss token within max_length=%d", example.line, max_length)
            continue
        num_truncated += truncated
        kept.append(TokenizedExample(ids, targets, example.line, truncated))
    return TokenizedSet(kept, num_truncated, num_dropped, tokens_cut, exact, longest)


def _tokenize_text(examples: Sequence[Example], tokenizer: ChatTokenizer, max_length: int):
    """Plain text and the end-of-sequence token, every token learnt."""
    eos = tokenizer.eos_token_id
    out = []
    for encoded in _encode_bounded(tokenizer, [e.text for e in examples], max_length, add_special_tokens=True):
        if eos is not None and not encoded.cut and (not encoded.ids or encoded.ids[-1] != eos):
            encoded = _Encoded(encoded.ids + [eos], encoded.offsets, encoded.num_tokens + 1, False)
        out.append((encoded, [True] * len(encoded.ids)))
    return out


def _tokenize_chat(
    examples: Sequence[Example], tokenizer: ChatTokenizer, max_length: int, options: ChatOptions | None, source: str
):
    """Chat-template rendering, one batched tokenisation, assistant spans mapped to tokens by offsets."""
    rendered = [
        render_with_spans(_conversation(e), tokenizer, options, f"{source}:{e.line}" if source else f"line {e.line}")
        for e in examples
    ]
    out = []
    encoded_all = _encode_bounded(tokenizer, [text for text, _ in rendered], max_length, add_special_tokens=False)
    for (_, spans), encoded in zip(rendered, encoded_all):
        starts = [s for s, _ in encoded.offsets]
        ends = [e for _, e in encoded.offsets]
        mask = [False] * len(encoded.ids)
        for span_start, span_end in spans:
            # Every token that overlaps the span: its end is past the span's start and its start before its end.
            for t in range(bisect_right(ends, span_start), bisect_left(starts, span_end)):
                mask[t] = True
        out.append((encoded, mask))
    return out


def _conversation(example: Example) -> list[dict[str, str]]:
    if example.format == "prompt_response":
        return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]
    return [{"role": role, "content": content} for role, content in example.messages]


def _encode_bounded(tokenizer: ChatTokenizer, texts: list[str], max_length: int, add_special_tokens: bool):
    """Tokenise ``texts`` in one batched call, each cut to what ``max_length`` can use (see the module's notes)."""
    enough = max_length + _MARGIN_TOKENS
    limit = cut_chars(max_length)
    results: list[_Encoded | None] = [None] * len(texts)
    pending = list(range(len(texts)))
    while pending:
        batch = [_cut(texts[i], limit) for i in pending]
        again = []
        for i, part, encoding in zip(pending, batch, tokenizer.encode_batch(batch, add_special_tokens)):
            ids = encoding.ids
            cut = len(part) < len(texts[i])
            if cut and len(ids) < enough:
                again.append(i)  # too few tokens to be sure the first max_length are the whole text's: cut longer
                continue
            num_tokens = round(len(ids) * len(texts[i]) / len(part)) if cut else len(ids)
            results[i] = _Encoded(ids, encoding.offsets, max(num_tokens, len(ids)), cut)
        pending, limit = again, limit * _GROWTH
    return results


def _cut(text: str, limit: int) -> str:
    """The first ``limit`` characters of ``text``, ending before a space or newline in the last half if there is
    one (a cut between words leaves the tokens before it as they are in the whole text)."""
    if len(text) <= limit:
        return text
    at = max(text.rfind(" ", limit // 2, limit), text.rfind("\n", limit // 2, limit))
    return text[: at if at > 0 else limit]
