import json

import pytest

from heroes.errors import HeroError, UnknownHero
from heroes.materialise import ensure_model
from heroes.profile import load_hero, parse_profile


def test_shipped_profiles_are_valid():
    tiny = load_hero("tiny-qwen3")
    assert tiny.architecture == "Qwen3ForCausalLM" and tiny.builder == "tiny-qwen3"
    assert load_hero("dio-qwen3-0.6b").hf_name == "Qwen/Qwen3-0.6B"


def test_broken_yaml_names_file_and_line():
    with pytest.raises(HeroError, match=r"bad.yaml:3: invalid YAML"):
        parse_profile("id: x\nname: [a, b\nmodel: {}\n", "bad.yaml")


def test_bad_keys_all_named_together():
    text = "id: x\nmodel: {hf_name: a, architecture: B, vocab_size: big, context_length: 8, colour: red}\nextra: 1\n"
    with pytest.raises(HeroError) as info:
        parse_profile(text, "h.yaml")
    message = str(info.value)
    assert "h.yaml: key 'model.vocab_size'" in message and "model.colour" in message and "'extra'" in message


def test_unknown_hero_lists_known_ones():
    with pytest.raises(UnknownHero, match="tiny-qwen3"):
        load_hero("nope")
    with pytest.raises(UnknownHero, match="not valid"):
        load_hero("../../etc/passwd")


def test_hub_hero_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(HeroError, match="huggingface-cli download Qwen/Qwen3-0.6B"):
        ensure_model(load_hero("dio-qwen3-0.6b"), tmp_path)


def test_tiny_hero_loads_with_from_pretrained(tiny_hero_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hero_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < params < 10_000_000
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_heroes_cli_list_and_show(run_cli, guild_home):
    out = run_cli("heroes", "list")
    assert out.returncode == 0 and "tiny-qwen3" in out.stdout and "dio-qwen3-0.6b" in out.stdout
    shown = json.loads(run_cli("heroes", "show", "tiny-qwen3", "--json").stdout)
    assert shown["model_path"] == str(guild_home / "heroes" / "tiny-qwen3")
    missing = run_cli("heroes", "show", "ghost")
    assert missing.returncode == 2 and "ghost" in missing.stderr


def test_chat_section_is_validated_naming_file_and_key():
    base = "id: x\nmodel: {hf_name: a, architecture: B, vocab_size: 8, context_length: 8}\n"
    with pytest.raises(HeroError) as info:
        parse_profile(base + "chat: {template: model, thinking: maybe, colour: red}\n", "h.yaml")
    message = str(info.value)
    assert "h.yaml: key 'chat.thinking': must be one of keep, strip, not 'maybe'" in message
    assert "h.yaml: key 'chat.colour': unknown key; allowed: template, thinking" in message
    with pytest.raises(HeroError, match=r"h\.yaml: key 'chat\.template': must be one of chatml, model"):
        parse_profile(base + "chat: {template: llama}\n", "h.yaml")
    assert parse_profile(base + "chat: {thinking: strip}\n", "h.yaml").chat_options.thinking == "strip"
    assert parse_profile(base, "h.yaml").chat_options.thinking == "keep"


def test_shipped_heroes_keep_the_empty_think_block():
    assert load_hero("dio-qwen3-0.6b").chat_options.thinking == "keep"
    assert load_hero("tiny-qwen3").chat == {"template": "chatml", "thinking": "keep"}


def test_local_tokenizer_dir_finds_only_what_is_already_here(tmp_path, guild_home, monkeypatch):
    import huggingface_hub

    tiny = load_hero("tiny-qwen3")
    assert tiny.local_tokenizer_dir(tmp_path) is None  # not built yet: nothing is built to answer
    assert not (tmp_path / "heroes").exists()
    assert tiny.local_tokenizer_dir(guild_home) == guild_home / "heroes" / "tiny-qwen3"
    asked = []

    def cache(repo, filename, revision=None):
        asked.append((repo, filename, revision))
        return str(tmp_path / "snapshot" / filename) if len(asked) == 1 else object()  # found, then not cached

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    dio = load_hero("dio-qwen3-0.6b")
    assert dio.local_tokenizer_dir(tmp_path) == tmp_path / "snapshot"
    assert dio.local_tokenizer_dir(tmp_path) is None
    assert asked[0] == ("Qwen/Qwen3-0.6B", "tokenizer.json", "main")
