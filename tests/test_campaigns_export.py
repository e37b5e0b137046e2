"""``campaigns export``: trained tiny-hero campaigns (full and LoRA) become plain Hugging Face directories that
transformers (and peft, for an adapter) load and generate from in a process that imports no Guild code."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from campaigns.campaign import Campaign, CampaignStore
from campaigns.errors import ExportError
from campaigns.export import EXPORT_INFO, export_campaign
from config.schema import FinetuneConfig
from engine.trainer import TrainerEngine
from tests.engine_fixtures import (
    assert_bitwise_equal,
    chat_examples,
    one_torch_thread,  # noqa: F401 - a fixture
    small_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def home(tiny_hero_dir, tmp_path_factory):
    """A $GUILD_HOME with two trained campaigns of the tiny hero: ``full`` and ``lora``."""
    home = tmp_path_factory.mktemp("export-home")
    (home / "heroes").mkdir()
    os.symlink(tiny_hero_dir, home / "heroes" / "tiny-qwen3")
    store = CampaignStore(home)
    lora = FinetuneConfig(mode="lora", lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    for name, config in (("full", small_config(max_steps=2)),
                         ("lora", dataclasses.replace(small_config(max_steps=3, learning_rate=1e-2), finetune=lora))):
        campaign = store.create(Campaign(id=name, hero_id="tiny-qwen3"))
        result = TrainerEngine().run_job(chat_examples(), config, model_path=str(tiny_hero_dir),
                                         checkpoint_dir=store.checkpoint_root(campaign) / "job1", run_id="job1")
        with store.edit(name) as c:
            c.latest_checkpoint, c.current_step = result.checkpoint_path, result.final_step
    return home


_PLAIN_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for path in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1, :8].tolist()
            generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        out[path] = {"new_tokens": generated.shape[1] - ids.shape[1], "logits": logits, "ids": ids[0].tolist()}
    guild = sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "heroes", "campaigns", "config", "jobs"))
    print(json.dumps({"results": out, "guild_modules": guild}))
""")


def load_with_plain_transformers(*paths) -> dict:
    """Load and generate in a fresh interpreter that runs outside the repository and never imports Guild."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, *map(str, paths)], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["guild_modules"] == []
    return report["results"]


def test_full_and_merged_lora_exports_load_and_generate_with_plain_transformers(home, tiny_hero_dir, tmp_path):
    full = export_campaign(home, "full", tmp_path / "full")
    merged = export_campaign(home, "lora", tmp_path / "merged", merged=True)
    assert (full.kind, full.step, merged.kind, merged.step) == ("full", 2, "merged", 3)
    for result in (full, merged):
        names = {p.name for p in (tmp_path / result.kind).iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", EXPORT_INFO} <= names
        assert not names & {"optimizer.safetensors", "rng.safetensors", "trainer_state.json", "COMPLETE",
                            "adapter_model.safetensors"}
        assert "chat_template.jinja" in names or "chat_template" in (tmp_path / result.kind /
                                                                     "tokenizer_config.json").read_text()
    # A full export is the checkpoint's weights, bit for bit.
    assert_bitwise_equal(load_file(str(tmp_path / "full" / "model.safetensors")),
                         load_file(f"{CampaignStore(home).get('full').latest_checkpoint}/model.safetensors"))

    results = load_with_plain_transformers(tmp_path / "full", tmp_path / "merged")
    assert all(r["new_tokens"] == 5 for r in results.values())

    # The merged model computes what the trained base + adapter computes (peft's own loader, on the adapter export).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = export_campaign(home, "lora", tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(adapter.base_model)
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = torch.tensor([results[str(tmp_path / "merged")]["ids"]])
    with torch.no_grad():
        expected = with_adapter(ids).logits[0, -1, :8]
    merged_logits = torch.tensor(results[str(tmp_path / "merged")]["logits"])
    assert torch.allclose(merged_logits, expected, atol=1e-4)
    # ... and the adapter mattered: every adapted projection of the merged model moved away from the base's.
    merged_weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base_weights = load_file(str(tiny_hero_dir / "model.safetensors"))
    assert merged_weights.keys() == base_weights.keys()
    moved = {k for k in base_weights if not torch.equal(merged_weights[k], base_weights[k])}
    assert moved == {k for k in base_weights if k.endswith("_proj.weight")}


def test_an_adapter_export_is_peft_format_and_names_its_base(home, tiny_hero_dir, tmp_path):
    result = export_campaign(home, "lora", tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", EXPORT_INFO} <= names
    assert "model.safetensors" not in names and "optimizer.safetensors" not in names
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # The tiny hero is built locally: its base is that directory (a hub hero names its hub id, e.g. Qwen/Qwen3-4B).
    assert config["base_model_name_or_path"] == result.base_model == str(tiny_hero_dir)
    assert (config["peft_type"], config["r"], config["inference_mode"]) == ("LORA", 8, True)
    info = json.loads((tmp_path / "adapter" / EXPORT_INFO).read_text())
    assert (info["campaign"], info["kind"], info["finetune_mode"], info["step"]) == ("lora", "adapter", "lora", 3)


def test_refusals_are_one_line_with_the_fix_and_leave_nothing_behind(home, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(ExportError, match=r"taken already exists and is not empty: export into a new directory"):
        export_campaign(home, "full", taken)
    assert (taken / "x").read_text() == "mine"

    CampaignStore(home).create(Campaign(id="fresh", hero_id="tiny-qwen3"))
    with pytest.raises(ExportError, match=r"campaign fresh has no checkpoint yet: train a job first"):
        export_campaign(home, "fresh", tmp_path / "out")
    broken = tmp_path / "step-00001"
    broken.mkdir()
    with pytest.raises(ExportError, match=r"is not a complete checkpoint"):
        export_campaign(home, "full", tmp_path / "out", checkpoint=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00001", "taken"]  # no temp dir, no OUT

    from campaigns.__main__ import main
    from config.settings import reset_settings_cache

    monkeypatch.setenv("GUILD_HOME", str(home))
    reset_settings_cache()
    try:
        assert main(["export", "full", str(taken)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "export into a new directory" in err[0]
        empty = tmp_path / "empty"
        empty.mkdir()  # an empty directory is fine
        assert main(["export", "lora", str(empty)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("exported campaign lora step 3 (adapter) to ") and "PeftModel.from_pretrained" in out
    finally:
        reset_settings_cache()
