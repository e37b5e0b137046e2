"""A hero's tokenizer and chat template, as the engine uses them: loadable without torch or transformers.

Training gets a Hugging Face tokenizer from ``AutoTokenizer`` and wraps it (:func:`as_chat_tokenizer`); enqueue-time
reports load the same files straight from the model directory (:func:`load_chat_tokenizer`, ~20 ms of imports:
``tokenizers`` and ``jinja2``, not the ~1.2 s of ``transformers``). Both give a :class:`ChatTokenizer` that renders
with the same Jinja environment and tokenises with the same Rust tokenizer, so a count made at enqueue is the
count training makes.

The Jinja environment is the one Hugging Face documents for chat templates: a sandbox, ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block (rendered as its body), a
``tojson`` filter that keeps non-ASCII text, and the globals ``raise_exception`` and ``strftime_now``. The template
sees ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None), the named special tokens
(``bos_token``, ``eos_token``, ...) and any extra keyword (``enable_thinking``).
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.errors import ChatTemplateError, ModelLoadError

logger = logging.getLogger(__name__)

# The named special tokens a template sees, as Hugging Face passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Hugging Face tokenizer -> its ChatTokenizer, so that a template is compiled and probed once per tokenizer.
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ChatTemplate:
    """A compiled chat template and where it came from.

    Args:
        text: the Jinja source.
        origin: where it lives, for error messages (``/models/x/chat_template.jinja``).

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(self, text: str, origin: str):
        self.text = text
        self.origin = origin
        try:
            self._compiled = _environment().from_string(text)
        except Exception as exc:  # noqa: BLE001 - a syntax error, or anything else Jinja raises while compiling
            raise ChatTemplateError(
                f"the chat template in {origin} does not compile ({type(exc).__name__}: {exc}); fix or replace it"
            ) from None

    def render(
        self,
        messages: list[dict[str, str]],
        special_tokens: dict[str, str],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render ``messages``. Exceptions of the template (``raise_exception``, a bad index...) propagate."""
        return self._compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
            **kwargs,
        )


@dataclass
class ChatTokenizer:
    """A fast (Rust) tokenizer, its named special tokens and its chat template (None when it has none).

    Attributes:
        backend: a ``tokenizers.Tokenizer``: ``encode_batch`` gives ids and character offsets.
        origin: the model directory (or hub name) the tokenizer came from, for error messages.
        cache: per-tokenizer state other modules keep (the template's turn markers, skeletons); see
            :mod:`engine.chat_turns`.
    """

    backend: Any
    special_tokens: dict[str, str]
    template: ChatTemplate | None
    origin: str
    eos_token_id: int | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        if self.template is None:
            raise ModelLoadError(
                f"the tokenizer of {self.origin} has no chat template, which 'messages' and 'prompt_response' "
                f"datasets need; add one ({CHAT_TEMPLATE_FILE}) to the model directory"
            )
        return self.template.render(messages, self.special_tokens, add_generation_prompt, **kwargs)

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[Any]:
        """One batched call to the Rust tokenizer; each result has ``.ids`` and ``.offsets`` (characters)."""
        # Hugging Face switches truncation and padding off before every plain call; a tokenizer that was last
        # used with them on would cut or pad here, so do the same.
        if self.backend.truncation is not None:
            self.backend.no_truncation()
        if self.backend.padding is not None:
            self.backend.no_padding()
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)


def load_chat_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """Load the tokenizer and chat template of a model directory with ``tokenizers`` and ``jinja2`` only.

    Reads ``tokenizer.json``, the named special tokens of ``tokenizer_config.json`` and the template from
    ``chat_template.jinja`` or, for older saves, the ``chat_template`` key of ``tokenizer_config.json``.

    Raises:
        ModelLoadError: there is no ``tokenizer.json`` or it cannot be read.
        ChatTemplateError: the template does not compile.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    try:
        backend = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    except Exception as exc:  # noqa: BLE001 - missing file, bad JSON, unknown model type: all one problem
        raise ModelLoadError(
            f"cannot load {model_dir / TOKENIZER_FILE}: {type(exc).__name__}: {exc}; the engine needs a fast "
            "tokenizer (tokenizer.json) in the model directory"
        ) from None
    config: dict[str, Any] = {}
    config_path = model_dir / TOKENIZER_CONFIG_FILE
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {config_path}: {exc}") from None
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken saved as {"content": ..., "special": ...}
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    template = None
    jinja_path = model_dir / CHAT_TEMPLATE_FILE
    if jinja_path.exists():
        template = ChatTemplate(jinja_path.read_text(encoding="utf-8"), str(jinja_path))
    elif config.get("chat_template"):
        text = _default_template(config["chat_template"])
        if text:
            template = ChatTemplate(text, f"{config_path} (key chat_template)")
    eos = special.get("eos_token")
    return ChatTokenizer(
        backend=backend,
        special_tokens=special,
        template=template,
        origin=str(model_dir),
        eos_token_id=backend.token_to_id(eos) if eos else None,
    )


def as_chat_tokenizer(tokenizer: Any) -> ChatTokenizer:
    """The :class:`ChatTokenizer` of a Hugging Face fast tokenizer (or ``tokenizer`` itself if it is one).

    The result is kept (weakly) per tokenizer object and rebuilt only when its chat template changes, so the
    template is compiled and probed once per tokenizer.

    Raises:
        ModelLoadError: the tokenizer is not a fast (Rust) one.
        ChatTemplateError: its chat template does not compile.
    """
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelLoadError(
            "the model's tokenizer is not a fast (Rust) tokenizer; the engine needs its offsets "
            "to find assistant tokens. Ship a tokenizer.json with the model"
        )
    text = _default_template(getattr(tokenizer, "chat_template", None))
    try:
        cached = _WRAPPED.get(tokenizer)
    except TypeError:  # not hashable or not weakly referenceable: wrap it every time
        cached = None
    if cached is not None and (cached.template.text if cached.template else None) == text:
        return cached
    origin = str(getattr(tokenizer, "name_or_path", "") or "the model")
    template = ChatTemplate(text, _template_origin(origin)) if text else None
    special = {
        k: str(v)
        for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
        if k in SPECIAL_TOKEN_NAMES and v is not None
    }
    chat = ChatTokenizer(
        backend=tokenizer.backend_tokenizer,
        special_tokens=special,
        template=template,
        origin=origin,
        eos_token_id=tokenizer.eos_token_id,
    )
    try:
        _WRAPPED[tokenizer] = chat
    except TypeError:
        pass
    return chat


def _default_template(value: Any) -> str | None:
    """The template to use from a ``chat_template`` value: a string, or the "default" of several named ones."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        return value.get("default") or None
    if isinstance(value, list):  # tokenizer_config.json's [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or None
    return None


def _template_origin(model: str) -> str:
    path = Path(model)
    if (path / CHAT_TEMPLATE_FILE).exists():
        return str(path / CHAT_TEMPLATE_FILE)
    if (path / TOKENIZER_CONFIG_FILE).exists():
        return f"{path / TOKENIZER_CONFIG_FILE} (key chat_template)"
    return f"the chat template of {model}"


_ENVIRONMENT = None


def _environment():
    """The sandboxed Jinja environment chat templates are written for (built once; imports jinja2 lazily)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks what the assistant writes; here it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _ENVIRONMENT = env
    return env
