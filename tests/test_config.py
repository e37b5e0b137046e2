import pytest

from config.errors import ConfigError, SettingsError
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


@pytest.mark.parametrize("cuda, guild_ranks, expected", [
    (None, None, (1, "cpu")),  # an unpinned worker: one process, on whatever the engine finds
    ("3", None, (1, "cuda")),  # make worker GPU=3
    ("0,1,2,3", None, (4, "cuda")),  # make worker GPUS=0,1,2,3: one rank per GPU
    ("GPU-aa,GPU-bb", "2", (2, "cuda")),
    ("", "2", (2, "cpu")),  # a CPU worker with two CPU ranks (tests, development)
    ("-1", None, (1, "cpu")),
])
def test_a_workers_ranks(tmp_path, cuda, guild_ranks, expected):
    env = {"GUILD_HOME": str(tmp_path), **({"CUDA_VISIBLE_DEVICES": cuda} if cuda is not None else {}),
           **({"GUILD_RANKS": guild_ranks} if guild_ranks else {})}
    settings = Settings.from_env(env)
    assert (settings.ranks, settings.rank_device) == expected


def test_ranks_that_contradict_the_gpus_are_refused(tmp_path):
    with pytest.raises(SettingsError, match=r"GUILD_RANKS=3 but CUDA_VISIBLE_DEVICES='0,1' lists 2 GPU\(s\)"):
        Settings.from_env({"GUILD_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "0,1", "GUILD_RANKS": "3"})
    with pytest.raises(SettingsError, match='GUILD_RANKS=2 needs CUDA_VISIBLE_DEVICES=""'):
        Settings.from_env({"GUILD_HOME": str(tmp_path), "GUILD_RANKS": "2"})
    with pytest.raises(SettingsError, match="GUILD_GANG_TIMEOUT_S must be positive"):
        Settings.from_env({"GUILD_HOME": str(tmp_path), "GUILD_GANG_TIMEOUT_S": "0"})


# ---- finetune mode and adapter settings --------------------------------------------------------------------


def test_finetune_shorthand_lists_and_defaults():
    default = resolve([]).config.finetune
    assert (default.mode, default.lora_rank, default.lora_alpha) == ("full", 16, 32)
    assert default.lora_target_modules == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    resolved = resolve([Layer("hero", {"finetune": "lora"}, "h.yaml"),
                        Layer("campaign", {"finetune": {"lora_target_modules": ["q_proj", "v_proj"]}}, "c.json"),
                        Layer("cli", {"lora_rank": "8", "finetune.lora_dropout": "0"}, "--set", from_text=True)])
    ft = resolved.config.finetune
    assert (ft.mode, ft.lora_rank, ft.lora_dropout, ft.lora_target_modules) == ("lora", 8, 0.0, "q_proj,v_proj")
    assert resolved.sources["finetune.mode"] == "hero" and resolved.sources["finetune.lora_rank"] == "cli"
    text = resolve([Layer("cli", {"lora_target_modules": " q_proj , o_proj "}, "--set", from_text=True)])
    assert text.config.finetune.lora_target_modules == "q_proj,o_proj"


def test_bad_finetune_values_are_all_reported():
    with pytest.raises(ConfigError) as info:
        resolve([Layer("cli", {"finetune": "adapters", "lora_rank": "0", "lora_dropout": "1.5",
                               "lora_target_modules": "q proj"}, "--set", from_text=True)])
    problems = info.value.problems
    assert len(problems) == 4
    assert "'finetune'" in problems[0] and "must be one of full, lora, qlora, got 'adapters'" in problems[0]
    assert "lora_rank" in problems[1] and "must be positive" in problems[1]
    assert "lora_dropout" in problems[2] and "[0, 1)" in problems[2]
    assert "lora_target_modules" in problems[3] and "module names" in problems[3]


def test_global_batch_must_be_a_multiple_of_the_micro_batch():
    assert resolve([Layer("cli", {"global_batch_size": "16", "batch_size": "4"}, "--set", True)]).config
    with pytest.raises(ConfigError, match=r"global_batch_size 10 is not a multiple of hyperparams.batch_size 4"):
        resolve([Layer("cli", {"global_batch_size": "10", "batch_size": "4"}, "--set", from_text=True)])


def test_locked_block_holds_the_finetune_mode():
    from config.schema import FinetuneConfig
    from heroes.profile import load_hero

    hero = load_hero("tiny-qwen3")
    full = build_locked_config(hero, "/m", 256, None, finetune=FinetuneConfig())
    lora = build_locked_config(hero, "/m", 256, None, finetune=FinetuneConfig(mode="lora", lora_rank=8))
    assert full["finetune_mode"] == "full" and full["lora_rank"] is None
    assert (lora["finetune_mode"], lora["lora_rank"], lora["lora_alpha"]) == ("lora", 8, 32)
    assert locked_differences(full, lora) == [
        "finetune_mode: campaign has 'full', job resolves 'lora'", "lora_rank: campaign has None, job resolves 8",
        "lora_alpha: campaign has None, job resolves 32",
        "lora_target_modules: campaign has None, job resolves 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj'"]
    # A campaign stored before the finetune fields existed trained fully: it still matches a full job, not a LoRA one.
    legacy = build_locked_config(hero, "/m", 256, None)
    assert "finetune_mode" not in legacy and locked_differences(legacy, full) == []
    assert locked_differences(legacy, lora)[0] == "finetune_mode: campaign has 'full', job resolves 'lora'"
    changed = build_locked_config(hero, "/m", 256, None, finetune=FinetuneConfig(mode="lora", lora_rank=16))
    assert locked_differences(lora, changed) == ["lora_rank: campaign has 8, job resolves 16"]
    # Dropout is a training setting, not part of what the checkpoints are.
    assert locked_differences(lora, build_locked_config(
        hero, "/m", 256, None, finetune=FinetuneConfig(mode="lora", lora_rank=8, lora_dropout=0.2))) == []
