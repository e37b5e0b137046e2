"""LoRA through the engine on the tiny hero: only the adapter trains, the loss falls, checkpoints hold the adapter
as safetensors in PEFT's format, a stopped job resumes bitwise; QLoRA is refused on the CPU before loading."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from config.schema import FinetuneConfig
from engine.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    finetune_refusal,
    is_adapted,
    parameter_counts,
    trainable_state_dict,
)
from engine.checkpoint import latest_checkpoint
from engine.errors import CheckpointError, FinetuneUnsupported
from engine.trainer import TrainerEngine
from tests.engine_fixtures import (
    assert_bitwise_equal,
    chat_examples,
    load_weights,
    one_torch_thread,  # noqa: F401 - a fixture
    small_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_LORA_R8_PARAMS = 155_648  # 4 layers x r 8 x (q 256+512, k 256+128, v 256+128, o 512+256, 3 x MLP 256+768)


def lora_config(mode: str = "lora", **hyperparams):
    base = dict(max_steps=8, learning_rate=1e-2)
    base.update(hyperparams)
    return dataclasses.replace(small_config(**base),
                               finetune=FinetuneConfig(mode=mode, lora_rank=8, lora_alpha=16, lora_dropout=0.0))


def run(engine, tiny_hero_dir, directory, config, stop_after=None, **kwargs):
    steps = []
    result = engine.run_job(chat_examples(), config, lambda step, *rest: steps.append(step),
                            (lambda: bool(steps) and steps[-1] >= stop_after) if stop_after else None,
                            model_path=str(tiny_hero_dir), checkpoint_dir=directory, run_id="job", **kwargs)
    return result


@pytest.fixture(scope="module")
def lora_run(tiny_hero_dir, tmp_path_factory):
    engine = TrainerEngine()
    result = run(engine, tiny_hero_dir, tmp_path_factory.mktemp("lora"), lora_config())
    assert result.status == "completed" and result.final_step == 8
    return engine, result


def test_only_the_adapter_trains_and_the_loss_falls(tiny_hero_dir, lora_run):
    engine, result = lora_run
    model = engine._model
    assert is_adapted(model)
    counts = parameter_counts(model)
    assert counts.trainable == TINY_LORA_R8_PARAMS and counts.total == 4_197_120 + TINY_LORA_R8_PARAMS
    trained = trainable_state_dict(model)
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(t.abs().sum() > 0 for n, t in trained.items() if ".lora_B." in n)  # B starts at zero: it moved

    # Every base weight is bitwise the hero's: nothing but the adapter changed.
    base = load_weights(tiny_hero_dir)
    live = {n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    assert_bitwise_equal({n: live[n] for n in base}, base)

    losses = [loss for _, loss in result.loss_history]
    # Step 1 sees the untouched base (B = 0): the tiny hero's own loss on the first batch.
    assert losses[0] == pytest.approx(8.3642, rel=1e-4)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    assert result.final_val_loss < losses[0] - 0.4


def test_adapter_checkpoints_are_safetensors_in_peft_format(lora_run):
    _, result = lora_run
    checkpoint = latest_checkpoint(result.checkpoint_path.rsplit("/", 1)[0])
    names = {p.name for p in checkpoint.iterdir()}
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "optimizer.safetensors"} <= names
    assert "model.safetensors" not in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    tensors = load_file(str(checkpoint / ADAPTER_WEIGHTS))
    assert len(tensors) == 56 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    adapter = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 8, 16)
    # The optimizer holds state for the adapter only (AdamW: step, exp_avg, exp_avg_sq per tensor).
    assert len(load_file(str(checkpoint / "optimizer.safetensors"))) == 3 * 56


def test_stop_then_resume_is_bitwise_equal(tiny_hero_dir, tmp_path, lora_run):
    _, straight = lora_run
    config = lora_config()
    stopped = run(TrainerEngine(), tiny_hero_dir, tmp_path, config, stop_after=3)
    assert stopped.status == "stopped" and stopped.final_step == 3
    resumed = run(TrainerEngine(), tiny_hero_dir, tmp_path, config, resume_from=latest_checkpoint(tmp_path))
    assert resumed.status == "completed" and resumed.start_step == 3
    assert resumed.loss_history == straight.loss_history
    assert resumed.final_val_loss == straight.final_val_loss
    assert_bitwise_equal(load_file(f"{resumed.checkpoint_path}/{ADAPTER_WEIGHTS}"),
                         load_file(f"{straight.checkpoint_path}/{ADAPTER_WEIGHTS}"))


def test_the_adapter_init_is_seeded_and_leaves_the_global_generator_alone(tiny_hero_dir):
    from engine.adapters import prepare_model
    from engine.model import load_model

    config = lora_config()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    weights = []
    for _ in range(2):
        torch.manual_seed(123)
        model = prepare_model(load_model(tiny_hero_dir), config, torch.device("cpu"))
        weights.append({n: t.clone() for n, t in trainable_state_dict(model).items()})
        assert torch.equal(torch.rand(3), expected_next)  # as if prepare_model had drawn nothing
    assert_bitwise_equal(*weights)


def test_qlora_is_refused_on_the_cpu_before_anything_loads(tiny_hero_dir, tmp_path):
    engine = TrainerEngine(device="cpu")
    with pytest.raises(FinetuneUnsupported, match=r"^finetune.mode qlora needs a CUDA GPU .* use finetune.mode lora$"):
        run(engine, tiny_hero_dir, tmp_path, lora_config("qlora"))
    assert engine._model is None


def test_qlora_needs_bitsandbytes_on_a_gpu():
    assert "pip install 'guild[qlora]'" in finetune_refusal("qlora", "cuda", bitsandbytes=False)
    assert finetune_refusal("qlora", "cuda", bitsandbytes=True) is None
    assert finetune_refusal("lora", "cpu") is None and finetune_refusal("full", "cpu") is None


def test_target_modules_that_do_not_exist_name_the_real_ones(tiny_hero_dir, tmp_path):
    config = dataclasses.replace(lora_config(), finetune=FinetuneConfig(mode="lora", lora_target_modules="c_attn"))
    with pytest.raises(FinetuneUnsupported, match=r"'c_attn' does not fit this model .* its linear layers are: "
                                                  r"down_proj, gate_proj, k_proj, lm_head, o_proj"):
        run(TrainerEngine(), tiny_hero_dir, tmp_path, config)


def test_a_lora_job_cannot_resume_a_full_checkpoint(tiny_hero_dir, tmp_path):
    full = run(TrainerEngine(), tiny_hero_dir, tmp_path / "full", small_config(max_steps=1))
    with pytest.raises(CheckpointError, match="holds no adapter .* full fine-tuning checkpoint"):
        run(TrainerEngine(), tiny_hero_dir, tmp_path / "lora", lora_config(), resume_from=full.checkpoint_path)
