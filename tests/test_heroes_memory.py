"""Memory estimates: parameter counts against real models, a hand-computed 0.6B figure, refusals with their fixes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from config.layers import Layer, resolve
from config.schema import FinetuneConfig, Hyperparams, TrainerConfig
from heroes.errors import HeroError
from heroes.memory import (
    GIB,
    ModelShape,
    WontFit,
    check_fits,
    estimate_memory,
    hero_estimates,
)
from heroes.profile import load_hero, parse_profile

QWEN3_06B = ModelShape(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, tied_embeddings=True)


def config(mode: str = "full", **hyperparams) -> TrainerConfig:
    return TrainerConfig(hyperparams=Hyperparams(**hyperparams), finetune=FinetuneConfig(mode=mode))


def test_the_tiny_heros_shape_counts_its_real_parameters(tiny_hero_dir):
    from transformers import AutoModelForCausalLM

    from engine.adapters import parameter_counts, prepare_model

    shape = load_hero("tiny-qwen3").shape
    assert shape == ModelShape.from_hf_config(json.loads((tiny_hero_dir / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir)
    assert shape.parameters() == sum(p.numel() for p in model.parameters()) == 4_197_120
    lora = dataclasses.replace(config("lora"), finetune=FinetuneConfig(mode="lora", lora_rank=8))
    counts = parameter_counts(prepare_model(model, lora, "cpu"))
    assert shape.lora_parameters(8, lora.finetune.lora_target_modules) == counts.trainable == 155_648


def test_catalogue_parameter_counts_match_the_published_sizes():
    sizes = {hid: load_hero(hid).shape.parameters() for hid in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")}
    # Qwen3-0.6B: 596,049,920 parameters, 0.44B without embeddings (its model card).
    assert sizes["qwen3-0.6b"] == 596_049_920
    assert sizes["qwen3-0.6b"] - 151936 * 1024 == pytest.approx(0.44e9, rel=0.01)
    assert sizes["qwen3-1.7b"] == pytest.approx(1.72e9, rel=0.005)
    assert sizes["qwen3-4b"] == pytest.approx(4.02e9, rel=0.005)
    assert sizes["qwen3-8b"] == pytest.approx(8.19e9, rel=0.005)  # untied: the output embedding counts again
    assert load_hero("dio-qwen3-0.6b").shape == load_hero("qwen3-0.6b").shape


def test_a_hand_computed_06b_full_fine_tuning_estimate():
    est = estimate_memory(QWEN3_06B, config(batch_size=1, max_length=1024))
    p = 596_049_920
    assert (est.weights, est.gradients, est.optimizer) == (6 * p, 4 * p, 8 * p)  # fp32 + bf16 copies; fp32; AdamW
    # Per token and layer: 10 h + 5 q + 5 kv (norms) + 2 q + 2 kv (attention) + 4 i = 44,032 bf16 elements.
    per_token_layer = 10 * 1024 + 7 * 2048 + 7 * 1024 + 4 * 3072
    assert per_token_layer == 44_032
    assert est.activations == 1024 * 28 * per_token_layer * 2
    # The chunked loss: one chunk's logits (the 1,024 tokens fit one chunk of 2^28 / 151,936 = 1,766), and the
    # fp32 gradients it accumulates: the hidden states at the loss positions and the output layer's weight.
    assert est.logits == 1024 * 151936 * 12 + 1024 * 1024 * 4 + 151936 * 1024 * 4 == 2_493_513_728
    subtotal = 18 * p + 2_524_971_008 + 2_493_513_728
    assert est.overhead == int(1.5 * GIB) + int(0.1 * subtotal)
    assert est.total == 18_932_734_361  # 17.63 GiB
    assert est.describe().startswith("17.6 GiB (weights 3.3, gradients 2.2, optimizer 4.4, activations 2.4, logits 2.3")


def test_the_logits_chunk_is_the_engines():
    import engine.loss
    from heroes.memory import LOGIT_CHUNK_ELEMENTS, LOGIT_CHUNK_MIN_TOKENS

    assert LOGIT_CHUNK_ELEMENTS == engine.loss.CHUNK_ELEMENTS["cuda"]
    import torch

    assert engine.loss.chunk_tokens(151936, torch.device("cuda")) == LOGIT_CHUNK_ELEMENTS // 151936 == 1766
    assert engine.loss.chunk_tokens(2**30, torch.device("cuda")) == LOGIT_CHUNK_MIN_TOKENS
    # Beyond one chunk, more tokens per micro-batch add only their hidden-state gradient.
    short = estimate_memory(QWEN3_06B, config(batch_size=1, max_length=2048))
    long = estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048))
    assert long.logits - short.logits == 2048 * 1024 * 4


def test_modes_checkpointing_and_ranks_change_what_they_should():
    full = estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048))
    lora = estimate_memory(QWEN3_06B, config("lora", batch_size=2, max_length=2048))
    qlora = estimate_memory(QWEN3_06B, config("qlora", batch_size=2, max_length=2048))
    adapter = QWEN3_06B.lora_parameters(16, FinetuneConfig().lora_target_modules)
    assert adapter == 10_092_544
    assert (lora.weights, lora.gradients, lora.optimizer) == (2 * 596_049_920 + 4 * adapter, 4 * adapter, 8 * adapter)
    assert qlora.weights < lora.weights and qlora.activations == lora.activations
    assert lora.activations > full.activations  # dropout keeps each adapted module's input
    checkpointed = estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048, gradient_checkpointing=True))
    assert checkpointed.activations == 4096 * (28 * 1024 * 2 + 44_032 * 2)
    ddp = estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048), ranks=2)
    assert ddp.gradients == 2 * full.gradients and ddp.weights == full.weights
    fsdp = estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048), ranks=4, strategy="fsdp")
    assert fsdp.optimizer == full.optimizer // 4 and fsdp.weights < full.weights // 2
    assert estimate_memory(QWEN3_06B, config(batch_size=2, max_length=2048, sharding="fsdp"), ranks=4) == fsdp


def test_a_job_that_does_not_fit_is_refused_with_the_estimate_and_fixes():
    hero = load_hero("qwen3-8b")
    full = resolve([Layer("hero", hero.training_defaults, hero.source), Layer("cli", {"finetune": "full"}, "--set",
                                                                              from_text=True)]).config
    with pytest.raises(WontFit) as info:
        check_fits(hero.shape, full, 80 * GIB)
    assert str(info.value) == (
        "this job needs ~163.1 GiB (weights 45.8, gradients 30.5, optimizer 61.0, activations 4.2, logits 5.4, "
        "overhead 16.2) per GPU in finetune.mode full, more than the 80.0 GiB of this worker's GPU; "
        "fix: finetune=lora in a new campaign (~27.6 GiB); or hyperparams.sharding=fsdp on a worker with 4 GPUs "
        "(make worker GPUS=0,...,3; ~50.6 GiB each)")

    big_batch = config(batch_size=8, max_length=2048, gradient_accumulation_steps=2)
    with pytest.raises(WontFit, match=r"fix: batch_size=4 gradient_accumulation_steps=4 \(~37.2 GiB, the same rows "
                                      r"per step\); or gradient_checkpointing=true \(~18.9 GiB"):
        check_fits(QWEN3_06B, big_batch, 40 * GIB)
    with pytest.raises(WontFit, match=r"fix: batch_size=1 gradient_checkpointing=true max_length=1024 \(~15.2 GiB"):
        check_fits(QWEN3_06B, config(batch_size=4, max_length=2048, global_batch_size=32), 16 * GIB)


def test_what_fits_returns_its_estimate_and_a_cpu_worker_is_not_checked():
    hero = load_hero("qwen3-4b")
    defaults = resolve([Layer("hero", hero.training_defaults, hero.source)]).config
    assert check_fits(hero.shape, defaults, 80 * GIB).total == pytest.approx(17.35 * GIB, rel=0.002)
    assert check_fits(hero.shape, dataclasses.replace(defaults, finetune=FinetuneConfig()), None).mode == "full"


def test_every_catalogue_default_fits_one_80_gb_gpu():
    for hero_id, mode in (("qwen3-0.6b", "full"), ("qwen3-1.7b", "full"), ("qwen3-4b", "lora"), ("qwen3-8b", "lora")):
        default_mode, estimates = hero_estimates(load_hero(hero_id))
        assert default_mode == mode
        assert estimates[mode].total < 0.8 * 80e9, hero_id  # headroom under an 80 GB card's ~79.6 GiB


def test_a_bad_shape_names_every_key():
    text = """
id: x
model: {hf_name: a/b, architecture: Qwen3ForCausalLM, vocab_size: 10, context_length: 8,
        shape: {hidden_size: 0, num_layers: 2, num_heads: 2, num_kv_heads: 1, head_dim: 4, intermediate_size: 8,
                tied: true}}
"""
    with pytest.raises(HeroError) as info:
        parse_profile(text, "x.yaml")
    assert str(info.value).splitlines() == [
        "x.yaml: key 'model.shape.hidden_size': missing or not a positive whole number",
        "x.yaml: key 'model.shape.tied_embeddings': missing or not true or false",
        "x.yaml: key 'model.shape.tied': unknown key; allowed: hidden_size, num_layers, num_heads, num_kv_heads, "
        "head_dim, intermediate_size, tied_embeddings",
    ]


def test_heroes_list_shows_the_estimate_per_mode(capsys):
    from heroes.__main__ import main

    assert main(["list"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["ID"][2:6] == ["DEFAULT", "FULL", "LORA", "QLORA"]
    assert lines["qwen3-8b"][1:6] == ["Qwen/Qwen3-8B", "lora", "163.1G", "27.6G", "19.6G"]
    assert lines["qwen3-0.6b"][2] == "full"
