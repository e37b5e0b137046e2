"""Tokenizers with other chat templates, built offline from the tiny hero's tokenizer for the engine's tests.

Each style is a copy of the tiny hero's tokenizer with the style's special tokens added and its template (from
``tests/fixtures/chat_templates``) installed, saved as a Hugging Face model directory (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"


@dataclass(frozen=True)
class Style:
    name: str
    template: str | None  # a file in TEMPLATES; None keeps the tiny hero's ChatML
    special: tuple[str, ...] = ()  # added as special tokens
    plain: tuple[str, ...] = ()  # added as ordinary (non-special) tokens, as Qwen3 adds <think>
    bos: str | None = None
    end_of_turn: str = "<|im_end|>"


STYLES = {
    "chatml": Style("chatml", None),
    "qwen3": Style("qwen3", "qwen3_style.jinja", plain=("<think>", "</think>")),
    "llama3": Style(
        "llama3",
        "llama3_style.jinja",
        special=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        end_of_turn="<|eot_id|>",
    ),
    "gemma": Style(
        "gemma",
        "gemma_style.jinja",
        special=("<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        end_of_turn="<end_of_turn>",
    ),
}


def build_styled_tokenizer(hero_dir: Path, target: Path, style: Style) -> Path:
    """Save a copy of the tiny hero's tokenizer in ``style`` to ``target``; returns ``target``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hero_dir)
    if style.special:
        tokenizer.add_tokens(list(style.special), special_tokens=True)
    if style.plain:
        tokenizer.add_tokens(list(style.plain))
    if style.bos:
        tokenizer.bos_token = style.bos
    if style.template:
        tokenizer.chat_template = (TEMPLATES / style.template).read_text(encoding="utf-8")
    tokenizer.save_pretrained(target)
    return target


def with_template(hero_dir: Path, target: Path, template: str) -> Path:
    """A copy of the tiny hero's tokenizer whose chat template is ``template``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hero_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return target
