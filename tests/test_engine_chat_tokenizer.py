"""engine.chat_tokenizer: renders and tokenises as Hugging Face does, loaded from files without transformers."""

from __future__ import annotations

import json

import pytest

from engine.chat_tokenizer import as_chat_tokenizer, load_chat_tokenizer
from engine.errors import ModelLoadError
from engine.formats import Example
from engine.tokenize import tokenize_examples
from tests.chat_fixtures import STYLES, build_styled_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "  And  é 数据? "},
    ],
    [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "\nB"},
    ],
]


@pytest.mark.parametrize("style", ["chatml", "qwen3", "llama3", "gemma"])
def test_rendering_and_tokens_match_hugging_face(tiny_hero_dir, tmp_path, style):
    from transformers import AutoTokenizer

    directory = build_styled_tokenizer(tiny_hero_dir, tmp_path / style, STYLES[style])
    hf = AutoTokenizer.from_pretrained(directory)
    ours = load_chat_tokenizer(directory)
    assert ours.special_tokens == hf.special_tokens_map and ours.eos_token_id == hf.eos_token_id
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            for extra in ({}, {"enable_thinking": False}):
                text = ours.render(conversation, add_generation_prompt=prompt, **extra)
                assert text == hf.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=prompt, **extra
                )
                (encoded,) = ours.encode_batch([text], add_special_tokens=False)
                assert encoded.ids == hf(text, add_special_tokens=False)["input_ids"]
    assert [e.ids for e in ours.encode_batch(["plain text"], add_special_tokens=True)] == [
        hf("plain text")["input_ids"]
    ]


def test_a_template_saved_in_tokenizer_config_is_found(tiny_hero_dir, tmp_path):
    """Older saves keep the template under tokenizer_config.json's chat_template key (or several, by name)."""
    directory = build_styled_tokenizer(tiny_hero_dir, tmp_path / "old", STYLES["llama3"])
    template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    (directory / "chat_template.jinja").unlink()
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    config_path.write_text(json.dumps(config), encoding="utf-8")
    chat = load_chat_tokenizer(directory)
    assert chat.template.text == template and "tokenizer_config.json (key chat_template)" in chat.template.origin
    assert chat.render([{"role": "user", "content": "Hi"}]).startswith("<|begin_of_text|><|start_header_id|>user")


def test_wrapping_is_cached_and_follows_a_changed_template(tiny_hero_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_hero_dir)
    first = as_chat_tokenizer(hf)
    assert as_chat_tokenizer(hf) is first and as_chat_tokenizer(first) is first
    hf.chat_template = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    assert as_chat_tokenizer(hf) is not first and as_chat_tokenizer(hf).template.text == hf.chat_template


def test_missing_tokenizer_or_template_says_what_to_add(tiny_hero_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_chat_tokenizer(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tiny_hero_dir / "tokenizer.json").read_bytes())
    chat = load_chat_tokenizer(bare)
    assert chat.template is None and chat.eos_token_id is None
    assert tokenize_examples([Example("text", 1, text="the harbor")], chat, 32).examples  # text needs no template
    with pytest.raises(ModelLoadError, match="no chat template.*chat_template.jinja"):
        tokenize_examples([Example("prompt_response", 1, prompt="a", response="b")], chat, 32)


def test_a_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ModelLoadError, match="not a fast"):
        as_chat_tokenizer(Slow())
