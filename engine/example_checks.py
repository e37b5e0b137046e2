"""What one line's JSON object must be: exactly one format's keys, and fields of the right types.

The per-line half of :mod:`engine.formats` (which reads the file, line by line, and reports the problems with
their file and line). Standard library only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

FORMATS = ("messages", "prompt_response", "text")
ROLES = ("system", "user", "assistant")
FORMAT_NAMES = {"messages": "messages", "prompt_response": "prompt/response", "text": "text"}
_FORMAT_OF_KEY = {"messages": "messages", "prompt": "prompt_response", "response": "prompt_response", "text": "text"}
_MESSAGE_KEYS = ("role", "content")
_ONE_OF = "a line holds exactly one of: messages / prompt+response / text"

# Keys of other well-known dataset layouts, and how to convert them.
_FOREIGN_KEY_HINTS = {
    "conversations": "convert ShareGPT 'conversations' (from/value) to 'messages' (role/content)",
    "instruction": "convert Alpaca instruction/input/output to 'prompt' and 'response'",
    "input": "convert Alpaca instruction/input/output to 'prompt' and 'response'",
    "output": "convert Alpaca instruction/input/output to 'prompt' and 'response'",
    "completion": "rename 'completion' to 'response'",
}
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}

# A JSON "\\ud83d" escape without its pair decodes to a lone surrogate, which no tokenizer can encode.
_SURROGATE = re.compile("[\\ud800-\\udfff]")

_MISSING = object()


def line_format(obj: dict) -> tuple[str | None, list[str]]:
    """Return the format a line's keys say (None if they say none or several) and the problems of its keys."""
    problems = []
    unknown = [key for key in obj if key not in _FORMAT_OF_KEY]
    if unknown:
        hint = _key_hint(unknown[0], _FORMAT_OF_KEY, _FOREIGN_KEY_HINTS)
        problems.append(
            f"unknown {_keys_phrase(unknown)}{hint}; {_ONE_OF}, and no other key (keep ids and metadata elsewhere)"
        )
    formats = sorted({_FORMAT_OF_KEY[key] for key in obj if key in _FORMAT_OF_KEY}, key=FORMATS.index)
    if len(formats) == 1:
        return formats[0], problems
    if len(formats) > 1:
        found = " and ".join(FORMAT_NAMES[fmt] for fmt in formats)
        problems.append(f"mixes formats ({found} keys); {_ONE_OF}")
    elif not obj:
        problems.append(f"empty object; {_ONE_OF}")
    return None, problems


def _keys_phrase(keys: list[str]) -> str:
    """Return "key 'a'" or "keys 'a', 'b'"."""
    quoted = ", ".join(repr(key) for key in keys)
    return f"key {quoted}" if len(keys) == 1 else f"keys {quoted}"


def _key_hint(key: str, choices: Iterable[str], hints: dict[str, str] | None = None) -> str:
    """Return a hint for an unknown key: how to convert it (from ``hints``), " (did you mean ...?)" or ""."""
    if hints and key in hints:
        return f" ({hints[key]})"
    close = difflib.get_close_matches(key.lower(), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def example_fields(fmt: str, obj: dict) -> tuple[dict | None, list[str]]:
    """Validate the fields of a line of format ``fmt``; return the Example fields (None if invalid) and the problems."""
    if fmt == "messages":
        messages, problems = _check_messages(obj["messages"])
        return ({"messages": messages} if not problems else None), problems
    if fmt == "prompt_response":
        problems = [
            problem
            for problem in (
                _check_string(obj, "prompt", "a prompt/response line needs both 'prompt' and 'response'"),
                _check_string(obj, "response", "a prompt/response line needs both 'prompt' and 'response'"),
            )
            if problem
        ]
        return ({"prompt": obj["prompt"], "response": obj["response"]} if not problems else None), problems
    problem = _check_string(obj, "text", "")
    return ({"text": obj["text"]} if not problem else None), ([problem] if problem else [])


def _check_messages(value: object) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """Validate a 'messages' value; return its (role, content) pairs and the problems."""
    if not isinstance(value, list):
        return (), [f"""'messages' must be a list of {{"role": ..., "content": ...}} objects, got {kind(value)}"""]
    if not value:
        return (), ["'messages' is an empty list; it needs at least one assistant message"]
    pairs: list[tuple[str, str]] = []
    problems: list[str] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(
                f"""{where} must be an object like {{"role": "user", "content": "..."}}, got {kind(message)}"""
            )
            continue
        unknown = [key for key in message if key not in _MESSAGE_KEYS]
        if unknown:
            problems.append(
                f"{where} has unknown {_keys_phrase(unknown)}{_key_hint(unknown[0], _MESSAGE_KEYS)}; "
                "a message holds exactly 'role' and 'content'"
            )
        role_problem = _check_role(message.get("role", _MISSING), where)
        content_problem = _check_string(message, "content", "", where=where, allow_blank=True)
        problems.extend(problem for problem in (role_problem, content_problem) if problem)
        if not (unknown or role_problem or content_problem):
            pairs.append((message["role"], message["content"]))
    if problems:
        return (), problems
    assistant = [content for role, content in pairs if role == "assistant"]
    if not assistant:
        return (), ["no assistant message; each example needs at least one message with role 'assistant'"]
    if not any(content.strip() for content in assistant):
        return (), ["every assistant message is empty; at least one needs non-empty content"]
    return tuple(pairs), []


def _check_role(role: object, where: str) -> str | None:
    """Return the problem with a message's role, or None."""
    if role is _MISSING:
        return f"{where} has no 'role'; use one of: {', '.join(ROLES)}"
    if not isinstance(role, str):
        return f"{where}.role must be a string, got {kind(role)}"
    if role in ROLES:
        return None
    if role.lower() in ROLES:
        hint = f" (roles are lowercase: {role.lower()!r})"
    elif role.lower() in _ROLE_HINTS:
        hint = f" (did you mean {_ROLE_HINTS[role.lower()]!r}?)"
    else:
        hint = ""
    return f"{where}.role is {role!r}{hint}; use one of: {', '.join(ROLES)}"


def _check_string(obj: dict, key: str, missing_hint: str, where: str = "", allow_blank: bool = False) -> str | None:
    """Return the problem with ``obj[key]``, which must be a (by default not blank) string, or None."""
    name = f"{where}.{key}" if where else f"'{key}'"
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        return f"{name} is missing" + (f"; {missing_hint}" if missing_hint else "")
    if not isinstance(value, str):
        return f"{name} must be a string, got {kind(value)}"
    if not allow_blank and not value.strip():
        return f"{name} is empty"
    surrogate = _SURROGATE.search(value)
    if surrogate:
        return (
            f"{name} holds an unpaired surrogate escape (\\u{ord(surrogate.group()):04x}); "
            "encode the text as valid UTF-8 (e.g. json.dumps of a proper str)"
        )
    return None


def kind(value: object) -> str:
    """Name a JSON value's type the way a user reads it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
