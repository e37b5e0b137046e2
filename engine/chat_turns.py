"""Where each assistant turn lies in a conversation rendered with any chat template.

The loss must land on the text of every assistant turn and on the token that closes it (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``...), and on nothing else, whatever the template does with the turns: Qwen3's
puts a think block on the assistant turn after the last user turn and shows earlier ones bare, Llama 3's trims
every message, Gemma's folds the system prompt into the first user turn. Rendering prefixes of the conversation
and assuming each is a prefix of the whole does not survive such templates, so turns are located in the one
rendering that is trained on:

* **Once per tokenizer**, probe conversations whose messages are unique placeholder words (one exchange, then
  two) give the template's *end-of-turn marker* (the text after a reply up to the separator, e.g.
  ``<|im_end|>``) and its *assistant header* (what the generation prompt adds, e.g.
  ``<|im_start|>assistant\\n``). A template that does not compile, or fails, renders nothing or leaves the text
  out for one plain user/assistant exchange (with or without a system prompt) is broken:
  :class:`ChatTemplateError`, a fault of the hero, not of any dataset.
* **Per conversation**, one rendering. Its *skeleton* (the same roles with placeholder contents; rendered once
  per sequence of roles and cached) gives the exact template text between messages; the rendering must be that
  text with each message's content in between, as given or as templates commonly transform it (stripped of
  whitespace or leading newlines, or with a ``<think>...</think>`` reasoning prefix split off). So the content is
  never searched for and text in it that looks like template markup cannot mislead.
* When the contents change the template's own text (Qwen3 renders an assistant's ``<think>`` reasoning in a
  block of its own), the contents are searched for in order instead, each search starting where the previous
  message ended; an assistant reply counts only where the assistant header precedes it (after an optional think
  block) and the end-of-turn marker follows it.

A reply that cannot be located, or that the template leaves out, is :class:`DatasetInvalid` naming the file and
line, never a turn that silently carries no loss.

**Think blocks** (``chat.thinking`` of a hero; :class:`ChatOptions`). A template like Qwen3's writes
``<think>\\n\\n</think>\\n\\n`` before the last reply when the data has no reasoning. That block is never learnt:

* ``keep`` (default): it stays in the input as prompt, which is exactly what the model is given at inference with
  ``enable_thinking=False`` (the generation prompt ends with the same empty block). The reply is learnt as the
  continuation of that block, and nothing is learnt at the point where the model decides whether to think, so
  its thinking mode is left as it was.
* ``strip``: it is cut out, so the last turn looks like the earlier ones. Then the reply's first token is learnt
  right after ``<|im_start|>assistant\\n``, where a thinking model would open ``<think>``: the model is taught
  to answer without thinking. Choose it for a model served with a plain generation prompt and no think blocks.

Reasoning that the data does contain (``<think>...</think>`` at the start of a reply) is what the model must learn
to write: where the template renders it, it is learnt with the reply; where the template drops it (Qwen3 drops
the reasoning of turns before the last user turn), only the reply is there to learn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from engine.chat_tokenizer import ChatTokenizer, as_chat_tokenizer
from engine.errors import ChatTemplateError, DatasetInvalid, ModelLoadError

logger = logging.getLogger(__name__)

THINKING_MODES = ("keep", "strip")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_PLACEHOLDER = "GuildMessage{}Placeholder"  # a word no template transforms (no whitespace, no markup)
_MAX_SKELETONS = 4096  # cached skeletons per tokenizer: one per distinct sequence of roles
_THINK_GAP = 64  # how much whitespace may separate a think block from the reply (Qwen3 writes two newlines)
_MAX_CANDIDATES = 10_000  # occurrences of a reply tried per turn by the search, so hostile text stays bounded


@dataclass(frozen=True)
class ChatOptions:
    """How conversations are rendered for training (a hero's ``chat`` section).

    Attributes:
        thinking: ``keep`` or ``strip`` the empty think block a template writes before the last reply.
    """

    thinking: str = "keep"

    def __post_init__(self) -> None:
        if self.thinking not in THINKING_MODES:
            raise ValueError(f"chat.thinking must be one of {', '.join(THINKING_MODES)}, not {self.thinking!r}")


@dataclass(frozen=True)
class TemplateMarkers:
    """What a template writes around an assistant reply, learnt once per tokenizer."""

    end_of_turn: str  # after every reply, e.g. "<|im_end|>"; "" when only whitespace follows a reply
    assistant_header: str | None  # before a reply, e.g. "<|im_start|>assistant\n"; None when it can't be told


@dataclass(frozen=True)
class _Skeleton:
    glue: tuple[str, ...]  # template text before, between and after the rendered contents
    present: tuple[int, ...]  # the messages whose content the template renders, in order
    missing_reply: int | None  # the index of an assistant message the template leaves out, if any


@dataclass(frozen=True)
class _Turn:
    region: int  # where the template text before this reply begins (the end of the previous message)
    start: int  # the reply's first character
    end: int  # just past its end-of-turn marker
    learn_from: int  # where the loss begins: start, or a rendered reasoning block before it


# ------------------------------------------------------------------------------------------------- public


def template_markers(tokenizer) -> TemplateMarkers:
    """The end-of-turn marker and assistant header of a tokenizer's chat template (probed once, then cached).

    Raises:
        ModelLoadError: the tokenizer is not a fast one, or it has no chat template.
        ChatTemplateError: the template fails, renders nothing or leaves the text out of a plain conversation.
    """
    chat = as_chat_tokenizer(tokenizer)
    markers = chat.cache.get("markers")
    if markers is None:
        markers = chat.cache["markers"] = _probe(chat)
    return markers


def render_with_spans(
    messages: list[dict[str, str]], tokenizer, options: ChatOptions | None = None, where: str = "conversation"
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character span of each assistant turn that carries loss.

    Each span covers the reply as rendered and the end-of-turn marker after it, not the separator (a newline)
    that follows.

    Args:
        messages: ``{"role", "content"}`` dicts.
        tokenizer: a :class:`ChatTokenizer` or a Hugging Face fast tokenizer with a chat template.
        options: how think blocks are treated.
        where: how to name the conversation in errors, e.g. ``data.jsonl:12``.

    Raises:
        DatasetInvalid: the template rejects this conversation, leaves a reply out, or a reply cannot be located.
        ChatTemplateError: the template itself is broken (see :func:`template_markers`).
    """
    options = options or ChatOptions()
    chat = as_chat_tokenizer(tokenizer)
    markers = template_markers(chat)
    try:
        text = chat.render(messages)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the template raises is about this conversation
        raise DatasetInvalid(
            f"{where}: the chat template ({chat.template.origin}) cannot render this conversation "
            f"({_describe(exc)}); fix the roles or order of its messages"
        ) from None
    turns = _locate_by_skeleton(text, messages, chat, markers, where)
    if turns is None:
        turns = _locate_by_search(text, messages, markers, where)
    if options.thinking == "strip":
        text, turns = _strip_empty_think_blocks(text, turns)
    return text, [(t.learn_from, t.end) for t in turns]


# -------------------------------------------------------------------------------------------- the probe


def _placeholders(roles: list[str]) -> list[dict[str, str]]:
    return [{"role": role, "content": _PLACEHOLDER.format(i)} for i, role in enumerate(roles)]


def _probe(chat: ChatTokenizer) -> TemplateMarkers:
    failures = []
    for prefix in ([], ["system"]):
        exchange = _render_placeholders(chat, [*prefix, "user", "assistant"])
        if isinstance(exchange, str):
            failures.append(exchange)
            continue
        messages, text, positions = exchange
        header = _generation_header(chat, messages[:-1])
        after_last = text[positions[-1] + len(messages[-1]["content"]) :]
        # The marker is what follows a reply both at the end and before the next turn: a template may add text
        # after the whole conversation, and the next turn's header follows the separator.
        two = _render_placeholders(chat, [*prefix, "user", "assistant", "user", "assistant"])
        if isinstance(two, str):
            end_of_turn = after_last.rstrip()
        else:
            messages, text, positions = two
            reply = len(prefix) + 1
            after_first = text[positions[reply] + len(messages[reply]["content"]) : positions[reply + 1]]
            after_last = text[positions[-1] + len(messages[-1]["content"]) :]
            end_of_turn = after_first[: _common_prefix_length(after_first, after_last)].rstrip()
        if not end_of_turn:
            logger.warning(
                "the chat template of %s closes assistant turns with no end-of-turn token: the model learns the "
                "replies but not where they end",
                chat.origin,
            )
        logger.debug("chat template of %s: end of turn %r, assistant header %r", chat.origin, end_of_turn, header)
        return TemplateMarkers(end_of_turn, header)
    raise ChatTemplateError(
        f"the chat template in {chat.template.origin} is broken: {failures[0]}; fix or replace the template "
        "(every dataset would fail the same way)"
    )


def _render_placeholders(chat: ChatTokenizer, roles: list[str]):
    """(messages, text, positions of their contents), or why the template can't render these roles."""
    messages = _placeholders(roles)
    conversation = "/".join(roles)
    try:
        text = chat.render(messages)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the template's own error, reported by the caller
        return f"it fails on a plain {conversation} conversation ({_describe(exc)})"
    positions = _in_order(text, [m["content"] for m in messages])
    if positions is None:
        what = "renders nothing" if not text.strip() else "leaves the messages' text out"
        return f"it {what} for a plain {conversation} conversation (rendered: {text[:200]!r})"
    return messages, text, positions


def _generation_header(chat: ChatTokenizer, prompt: list[dict[str, str]]) -> str | None:
    """What the generation prompt adds to a rendering: the header of an assistant turn."""
    try:
        bare = chat.render(prompt)
        prompted = chat.render(prompt, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - then the header is simply unknown
        return None
    if len(prompted) > len(bare) and prompted.startswith(bare):
        return prompted[len(bare) :]
    return None


def _describe(exc: Exception) -> str:
    """An exception as one short line (a template may quote a whole message in its error)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _in_order(text: str, words: list[str]) -> list[int] | None:
    """The position of each word in ``text``, if each occurs once and in order."""
    positions, pos = [], 0
    for word in words:
        at = text.find(word, pos)
        if at < 0 or text.find(word, at + 1) >= 0 or text.find(word, 0, at) >= 0:
            return None
        positions.append(at)
        pos = at + len(word)
    return positions


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------- the skeleton path


def _skeleton(chat: ChatTokenizer, messages: list[dict[str, str]]) -> _Skeleton | None:
    """The template text around the contents of a conversation with these roles (cached per sequence of roles).

    Blank system and user messages are rendered as they are (a template may leave them out); every other content
    is a unique placeholder word.
    """
    key = tuple(
        (m["role"], m["content"] if m["role"] != "assistant" and not m["content"].strip() else None) for m in messages
    )
    cache = chat.cache.setdefault("skeletons", {})
    if key in cache:
        return cache[key]
    placeholders = [
        {"role": m["role"], "content": _PLACEHOLDER.format(i) if content is None else content}
        for i, (m, (_, content)) in enumerate(zip(messages, key))
    ]
    skeleton = None
    try:
        text = chat.render(placeholders)
    except Exception:  # noqa: BLE001 - the real contents rendered; the search path will locate them
        text = None
    if text is not None:
        glue, present, pos = [], [], 0
        for i, (_, content) in enumerate(key):
            if content is not None:
                continue
            word = placeholders[i]["content"]
            at = text.find(word)
            if at < 0:
                continue
            if at < pos or text.find(word, at + 1) >= 0:  # reordered or repeated: no simple skeleton
                present = None
                break
            glue.append(text[pos:at])
            present.append(i)
            pos = at + len(word)
        if present is not None:
            glue.append(text[pos:])
            missing = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i not in present]
            skeleton = _Skeleton(tuple(glue), tuple(present), missing[0] if missing else None)
    if len(cache) >= _MAX_SKELETONS:
        cache.pop(next(iter(cache)))
    cache[key] = skeleton
    return skeleton


def _locate_by_skeleton(
    text: str, messages: list[dict[str, str]], chat: ChatTokenizer, markers: TemplateMarkers, where: str
) -> list[_Turn] | None:
    skeleton = _skeleton(chat, messages)
    if skeleton is None:
        return None
    if skeleton.missing_reply is not None:
        raise DatasetInvalid(
            f"{where}: the chat template ({chat.template.origin}) leaves out the content of message "
            f"{skeleton.missing_reply + 1} (an assistant reply), so it cannot be learnt; make every assistant reply "
            "one the template renders (e.g. split the conversation so that reply comes last)"
        )
    glue = skeleton.glue
    if not text.startswith(glue[0]):
        return None
    pos = len(glue[0])
    turns, region = [], 0
    for k, i in enumerate(skeleton.present):
        after, last = glue[k + 1], k == len(skeleton.present) - 1
        for form, _ in _forms(messages[i]):
            end = pos + len(form)
            if (
                text.startswith(form, pos)
                and text.startswith(after, end)
                and (not last or end + len(after) == len(text))
            ):
                break
        else:
            return None  # the contents change the template's text: search instead
        if messages[i]["role"] == "assistant":
            if not text.startswith(markers.end_of_turn, end):
                raise DatasetInvalid(
                    f"{where}: the chat template ({chat.template.origin}) does not close message {i + 1} (an assistant "
                    f"reply) with {markers.end_of_turn!r} as it closes others, so where the reply ends cannot be learnt"
                )
            turns.append(_Turn(region, pos, end + len(markers.end_of_turn), pos))
        region, pos = end, end + len(after)
    return turns


def _forms(message: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The content as templates commonly render it, most faithful first, each once: (form, reasoning it dropped)."""
    content = message["content"]
    seen = set()
    variants = [(content, "")]
    if message["role"] == "assistant" and THINK_CLOSE in content:
        reasoning = content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1]
        answer = content.split(THINK_CLOSE)[-1]
        variants.append((answer, reasoning))
    for text, reasoning in variants:
        for form in (text, text.lstrip("\n"), text.strip(), text.lstrip(), text.rstrip(), text.strip("\n")):
            if form not in seen:
                seen.add(form)
                yield form, reasoning


# ----------------------------------------------------------------------------------------- the search path


def _locate_by_search(text: str, messages: list[dict[str, str]], markers: TemplateMarkers, where: str) -> list[_Turn]:
    turns, cursor, reply = [], 0, 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            hits = [
                (at, at + len(form)) for form, _ in _forms(message) if form and (at := text.find(form, cursor)) >= 0
            ]
            if hits:
                cursor = min(hits)[1]
            continue
        reply += 1
        turn = _find_reply(text, message, cursor, markers)
        if turn is None and not message["content"].strip():
            raise DatasetInvalid(
                f"{where}: assistant reply {reply} (message {i + 1}) is empty, and where the chat template puts it "
                "cannot be told; remove the empty reply or give it text"
            )
        if turn is None:
            raise DatasetInvalid(
                f"{where}: cannot find assistant reply {reply} (message {i + 1}) in the conversation as the chat "
                "template renders it, so it would carry no loss; check that the template renders the reply as "
                f"written, ending with {markers.end_of_turn!r}"
            )
        turns.append(turn)
        cursor = turn.end
    return turns


def _find_reply(text: str, message: dict[str, str], cursor: int, markers: TemplateMarkers) -> _Turn | None:
    """The reply after ``cursor``: an occurrence of one of its forms that the assistant header precedes (after an
    optional think block) and the end-of-turn marker follows. Of the forms' first such occurrences the one that ends
    first wins, and of those the shortest: whitespace between a think block and the reply is the template's."""
    found = [
        turn
        for form, reasoning in _forms(message)
        if form and (turn := _first_valid(text, form, reasoning, cursor, markers)) is not None
    ]
    return min(found, key=lambda turn: (turn.end, -turn.start)) if found else None


def _first_valid(text: str, form: str, reasoning: str, cursor: int, markers: TemplateMarkers) -> _Turn | None:
    header, end_of_turn = markers.assistant_header, markers.end_of_turn
    at, tries = text.find(form, cursor), 0
    while at >= 0 and tries < _MAX_CANDIDATES:
        end = at + len(form)
        if text.startswith(end_of_turn, end):
            learn_from = _reasoning_block(text, cursor, at, reasoning) if reasoning.strip() else None
            anchor = learn_from if learn_from is not None else _empty_think_block(text, cursor, at)
            if header is None or text.endswith(header, cursor, at if anchor is None else anchor):
                return _Turn(cursor, at, end + len(end_of_turn), at if learn_from is None else learn_from)
        at, tries = text.find(form, at + 1), tries + 1
    return None


# ------------------------------------------------------------------------------------------ think blocks


def _think_block(text: str, lo: int, start: int, max_inner: int) -> tuple[int, str] | None:
    """A ``<think>...</think>`` block that ends right before ``start`` (whitespace apart), not before ``lo``."""
    close = text.rfind(THINK_CLOSE, max(lo, start - len(THINK_CLOSE) - _THINK_GAP), start)
    if close < 0 or text[close + len(THINK_CLOSE) : start].strip():
        return None
    opening = text.rfind(THINK_OPEN, max(lo, close - len(THINK_OPEN) - max_inner), close)
    if opening < 0:
        return None
    return opening, text[opening + len(THINK_OPEN) : close]


def _empty_think_block(text: str, lo: int, start: int) -> int | None:
    block = _think_block(text, lo, start, _THINK_GAP)
    return block[0] if block is not None and not block[1].strip() else None


def _reasoning_block(text: str, lo: int, start: int, reasoning: str) -> int | None:
    block = _think_block(text, lo, start, len(reasoning) + _THINK_GAP)
    return block[0] if block is not None and block[1].strip() == reasoning.strip() else None


def _strip_empty_think_blocks(text: str, turns: list[_Turn]) -> tuple[str, list[_Turn]]:
    """Cut the empty think block before each reply out of the text, moving the spans after each cut."""
    pieces, shifted, kept_from, removed = [], [], 0, 0
    for turn in turns:
        before = removed
        opening = _empty_think_block(text, turn.region, turn.learn_from)
        if opening is not None:  # the block lies between the previous message and this reply: no span is cut
            pieces.append(text[kept_from:opening])
            removed += turn.learn_from - opening
            kept_from = turn.learn_from
        shifted.append(_Turn(turn.region - before, turn.start - removed, turn.end - removed, turn.learn_from - removed))
    pieces.append(text[kept_from:])
    return "".join(pieces), shifted
