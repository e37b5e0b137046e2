import pytest

from config.errors import ConfigError
from config.layers import Layer, canonical_key, parse_set_args, resolve
from config.locked import build_locked_config, locked_differences
from config.schema import TrainerConfig
from config.settings import Settings


def test_bare_key_maps_to_dotted_and_unknown_is_named():
    assert canonical_key("learning_rate") == "hyperparams.learning_rate"
    with pytest.raises(KeyError, match="unknown key 'lr'"):
        canonical_key("lr")


def test_later_layers_win_and_sources_are_kept():
    resolved = resolve([Layer("hero", {"hyperparams": {"learning_rate": 0.1, "seed": 1}}, "h.yaml"),
                        Layer("campaign", {"seed": 2}, "campaign.json"),
                        Layer("cli", {"learning_rate": "1e-5"}, "--set", from_text=True)])
    assert resolved.config.hyperparams.learning_rate == 1e-5 and resolved.sources["hyperparams.learning_rate"] == "cli"
    assert resolved.config.hyperparams.seed == 2 and resolved.sources["hyperparams.seed"] == "campaign"


def test_every_problem_reported_together_with_layer_and_file():
    with pytest.raises(ConfigError) as info:
        resolve([Layer("project", {"batch_size": "x", "warmup_steps": -1, "precision": "fp8"}, "config.json"),
                 Layer("cli", {"enable_packing": "maybe"}, "--set", from_text=True)])
    problems = info.value.problems
    assert len(problems) == 4
    assert all("(project layer)" in p and "config.json" in p for p in problems[:3])
    assert "enable_packing" in problems[3] and "true or false" in problems[3]


def test_set_args_need_equals():
    assert parse_set_args(["a=1", "b.c=x=y"]) == {"a": "1", "b.c": "x=y"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_args(["oops"])


def test_config_hash_is_stable_and_changes_with_values():
    a, b = TrainerConfig(), TrainerConfig()
    assert a.config_hash() == b.config_hash() and a.config_hash().startswith("sha256:") and len(a.config_hash()) == 23
    changed = resolve([Layer("cli", {"seed": "7"}, "--set", from_text=True)]).config
    assert changed.config_hash() != a.config_hash()


def test_locked_block_from_hero_and_fallback():
    from heroes.profile import load_hero

    hero = load_hero("tiny-qwen3")
    locked = build_locked_config(hero, "/m", 256, None)
    assert locked == {"base_model": "guild/tiny-qwen3", "model_architecture": "Qwen3ForCausalLM",
                      "max_context_length": 1024, "vocab_size": 4096, "model_version": "1"}
    fallback = build_locked_config(None, "/models/x", 512, "abc")
    assert fallback["base_model"] == "/models/x" and fallback["max_context_length"] == 512
    diffs = locked_differences(locked, {**locked, "vocab_size": 8})
    assert diffs == ["vocab_size: campaign has 4096, job resolves 8"]


def test_settings_from_env(tmp_path):
    s = Settings.from_env({"GUILD_HOME": str(tmp_path), "ENABLE_PACKING": "0", "REDIS_URL": "redis://x:1/0"})
    assert s.guild_home == tmp_path and s.enable_packing is False and s.redis_url == "redis://x:1/0"
    default = Settings.from_env({"GUILD_HOME": str(tmp_path)})
    assert default.redis_url == "redis://127.0.0.1:6390/0" and default.enable_packing is None
