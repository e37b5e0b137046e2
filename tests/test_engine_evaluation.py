"""Evaluation on a fixed set (engine/evaluation.py, engine/generate.py) and how run_job uses it: the loss is the
training loss's definition, the same tokens whatever the job's max_length, evaluation never perturbs training, its
time is counted apart, probe answers come back the same from the checkpoint, and an over-budget set is refused."""

from __future__ import annotations

import json

import pytest

from engine.errors import EvalSetInvalid, EvalSetTooLarge
from engine.eval_plan import EvalPoint, EvalSpec, Probe, probes_from_examples
from engine.evaluation import evaluate_model, load_eval_model, prepare_eval_data
from engine.formats import Example, read_examples
from engine.trainer import TrainerEngine
from tests.engine_fixtures import CHAT_SMALL, chat_examples, one_torch_thread, small_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(CHAT_SMALL.read_text().splitlines(keepends=True)[200:210]))
    return path


def _spec(eval_file, **changes) -> EvalSpec:
    probes = tuple(probes_from_examples(read_examples(eval_file), 2))
    return EvalSpec(**{"dataset_path": str(eval_file), "name": "sha-of-eval", "max_length": 128, "probes": probes,
                       "max_new_tokens": 8, "seed": 3, **changes})


def test_probe_is_the_conversation_before_the_final_reply():
    chat = Example("messages", 4, messages=(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")))
    assert Probe.from_example(chat) == Probe((("system", "Be brief."), ("user", "2+2?")), "4", 4)
    assert Probe.from_example(Example("prompt_response", 2, prompt="Hi?", response="Hello")).messages == (
        ("user", "Hi?"),)
    assert Probe.from_example(Example("text", 1, text="plain")) is None
    line = Probe.from_example(chat).to_line()
    assert line["messages"][-1] == {"role": "assistant", "content": "4"}


def test_eval_loss_is_the_training_loss_definition_packed_or_not(tiny_hero_dir, eval_file):
    """Token-weighted over assistant tokens: summed per-token cross-entropy over their count, whatever the packing."""
    import torch
    from transformers import AutoTokenizer

    from engine.loss import token_losses
    from engine.packing import collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_hero_dir)
    model, _ = load_eval_model(str(tiny_hero_dir), None, torch.device("cpu"))
    spec = _spec(eval_file, probes=())
    packed, data = evaluate_model(model, tokenizer, spec, step=0, device=torch.device("cpu"), chat=None)
    # The reference: each example alone, every loss token's cross-entropy summed, over the count.
    total, count = 0.0, 0
    with torch.no_grad():
        for example in data.examples:
            losses = token_losses(model, collate([[0]], [example], data.pad_id)).double()
            total, count = total + losses.sum().item(), count + losses.numel()
    assert packed.num_loss_tokens == count == data.num_loss_tokens
    assert packed.loss == pytest.approx(total / count, rel=1e-5)
    assert packed.num_examples == 10 and len(data.rows) < 10  # several examples share a row
    # The same set evaluated one example per row gives the same number.
    unpacked = prepare_eval_data(read_examples(eval_file), tokenizer, max_length=128, packing=False)
    assert len(unpacked.rows) == 10 and unpacked.num_loss_tokens == count


def test_eval_set_too_big_for_its_budget_is_refused_before_training(tiny_hero_dir, eval_file, tmp_path):
    with pytest.raises(EvalSetTooLarge, match=r"has [\d,]+ tokens at max_length 128; hyperparams.eval_max_tokens "
                                              r"allows 100 per evaluation"):
        TrainerEngine().run_job(chat_examples(), small_config(max_steps=2), model_path=str(tiny_hero_dir),
                                checkpoint_dir=tmp_path / "ckpt", run_id="big",
                                evaluation=_spec(eval_file, max_tokens=100))
    assert not list((tmp_path / "ckpt").glob("step-*"))
    unusable = tmp_path / "unusable.jsonl"
    unusable.write_text(json.dumps({"messages": [{"role": "user", "content": "long " * 300},
                                                 {"role": "assistant", "content": "short"}]}) + "\n")
    with pytest.raises(EvalSetInvalid, match="max_length=32"):
        TrainerEngine().run_job(chat_examples(), small_config(max_steps=2), model_path=str(tiny_hero_dir),
                                checkpoint_dir=tmp_path / "ckpt2", run_id="bad",
                                evaluation=EvalSpec(str(unusable), "x", 32))


def test_run_job_evaluates_at_start_every_eval_steps_and_at_the_end(tiny_hero_dir, eval_file, tmp_path):
    """The fixed set at steps 0, 2, 4 on the same tokens; training unchanged by it (bitwise); its time apart; the
    answers stored at the last step are what the checkpoint gives again with the same seed."""
    config = small_config(max_steps=4, eval_steps=2, max_length=64)  # the job cuts at 64, the eval set at 128
    plain = TrainerEngine().run_job(chat_examples(), config, model_path=str(tiny_hero_dir),
                                    checkpoint_dir=tmp_path / "plain", run_id="job")
    seen: list[EvalPoint] = []
    result = TrainerEngine().run_job(chat_examples(), config, model_path=str(tiny_hero_dir),
                                     checkpoint_dir=tmp_path / "evaluated", run_id="job",
                                     evaluation=_spec(eval_file, at_start=True), on_eval=seen.append)
    assert result.status == "completed"
    assert [p.step for p in result.eval_history] == [0, 2, 4] and seen == result.eval_history
    assert len({(p.num_examples, p.num_loss_tokens) for p in result.eval_history}) == 1
    assert result.eval_history[0].num_examples == 10
    assert result.final_eval_loss == result.eval_history[-1].loss < result.eval_history[0].loss
    assert all(len(p.answers) == 2 and all(a.num_tokens <= 8 for a in p.answers) for p in result.eval_history)
    # Evaluation (RNG forked, attention and mode restored) leaves training exactly as it was.
    assert result.loss_history == plain.loss_history and result.val_history == plain.val_history
    # Its cost is counted apart: tokens/s is over training time only.
    assert result.eval_s >= sum(p.seconds for p in result.eval_history) > 0
    assert result.tokens_per_sec == pytest.approx(result.trained_tokens / result.train_s)
    state = json.loads((tmp_path / "evaluated" / "step-00004" / "trainer_state.json").read_text())
    assert [p["step"] for p in state["eval_history"]] == [0, 2, 4]  # the final checkpoint comes after the last one
    early = json.loads((tmp_path / "evaluated" / "step-00002" / "trainer_state.json").read_text())
    assert [p["step"] for p in early["eval_history"]] == [0, 2]

    import torch
    from transformers import AutoTokenizer

    model, _ = load_eval_model(str(tiny_hero_dir), result.checkpoint_path, torch.device("cpu"))
    again, _ = evaluate_model(model, AutoTokenizer.from_pretrained(tiny_hero_dir), _spec(eval_file), step=4,
                              device=torch.device("cpu"), chat=None)
    assert again.answers == result.eval_history[-1].answers
    assert again.loss == pytest.approx(result.final_eval_loss, rel=1e-5)


@pytest.mark.gpu
def test_on_a_gpu_evaluation_leaves_training_alone_and_answers_come_back(tiny_hero_dir, eval_file, tmp_path):
    """CUDA: the fixed set evaluated beside the GPU attention paths (flash_varlen or flex), generation switching
    attention to SDPA and back, bf16 autocast. Run: .venv/bin/python -m pytest -q -m gpu tests/test_engine_evaluation.py
    """
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from transformers import AutoTokenizer

    config = small_config(max_steps=4, eval_steps=2, max_length=64)
    plain = TrainerEngine(device="cuda").run_job(chat_examples(), config, model_path=str(tiny_hero_dir),
                                                 checkpoint_dir=tmp_path / "plain", run_id="job")
    result = TrainerEngine(device="cuda").run_job(chat_examples(), config, model_path=str(tiny_hero_dir),
                                                  checkpoint_dir=tmp_path / "gpu", run_id="job",
                                                  evaluation=_spec(eval_file, at_start=True))
    assert result.attention in ("flash_varlen", "flex") and [p.step for p in result.eval_history] == [0, 2, 4]
    assert [loss for _, loss in result.loss_history] == pytest.approx([loss for _, loss in plain.loss_history],
                                                                      abs=1e-3)
    model, _ = load_eval_model(str(tiny_hero_dir), result.checkpoint_path, torch.device("cuda"))
    again, _ = evaluate_model(model, AutoTokenizer.from_pretrained(tiny_hero_dir), _spec(eval_file), step=4,
                              device=torch.device("cuda"), chat=None)
    assert again.loss == pytest.approx(result.final_eval_loss, rel=2e-2)
    assert [a.text for a in again.answers] == [a.text for a in result.eval_history[-1].answers]
