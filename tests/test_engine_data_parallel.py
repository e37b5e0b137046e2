"""Data-parallel training on CPU ranks (gloo) of the tiny hero: N ranks train what one process trains.

One warm gang of two ranks (engine.ranks.GangTrainer) serves every test of this module, as it serves the jobs of a
worker: it is started once (the spawn and imports cost ~10 s here) and each job after that takes a few seconds.
The global batch is 8 rows (batch_size 2): one process accumulates 4 micro-batches, each of two ranks 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from config.errors import ConfigError
from config.schema import FinetuneConfig, TrainerConfig
from engine.adapters import ADAPTER_WEIGHTS
from engine.checkpoint import read_checkpoint_state
from engine.data_parallel import StepCounts
from engine.errors import DatasetInvalid
from engine.formats import Example
from engine.packing import collate
from engine.ranks import GangTrainer
from engine.schedule import lr_at
from engine.trainer import TrainerEngine
from tests.engine_fixtures import (
    assert_bitwise_equal,
    chat_examples,
    load_weights,
    one_torch_thread,  # noqa: F401 - a fixture
    small_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TOLERANCE = 1e-5  # fp32: sums in another order, never other data


def config(**hyperparams) -> TrainerConfig:
    base = dict(batch_size=2, global_batch_size=8, max_steps=4, save_steps=2, warmup_steps=2, eval_max_examples=4)
    base.update(hyperparams)
    return small_config(**base)


def lora(cfg: TrainerConfig) -> TrainerConfig:
    # No dropout: N ranks draw other dropout masks than one process (engine.data_parallel, "Random generators").
    return dataclasses.replace(cfg, finetune=FinetuneConfig(mode="lora", lora_rank=8, lora_alpha=16,
                                                            lora_dropout=0.0))


@pytest.fixture(scope="module")
def gang():
    trainer = GangTrainer(2, "cpu", timeout_s=120, grace_s=2)
    yield trainer
    trainer.close()


def train(engine, hero, directory, cfg, *, data=None, resume_from=None, run_id="job", stop_after=None):
    steps = []
    result = engine.run_job(data if data is not None else chat_examples(), cfg,
                            lambda step, *rest: steps.append((step, *rest)),
                            (lambda: bool(steps) and steps[-1][0] >= stop_after) if stop_after else None,
                            model_path=str(hero), checkpoint_dir=directory, resume_from=resume_from, run_id=run_id)
    return result, steps


def assert_close_weights(a: dict, b: dict, tolerance: float = TOLERANCE) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tolerance, worst


def assert_same_trajectory(one, two) -> None:
    assert [s for s, _ in one.loss_history] == [s for s, _ in two.loss_history]
    for (_, a), (_, b) in zip(one.loss_history, two.loss_history):
        assert abs(a - b) <= TOLERANCE, (one.loss_history, two.loss_history)
    assert abs(one.final_val_loss - two.final_val_loss) <= TOLERANCE
    assert (one.final_step, one.trained_tokens) == (two.final_step, two.trained_tokens)


def same_checkpoint_content(a: Path, b: Path) -> None:
    """The same files, the same state (steps, data position, config), the same RNG; weights within tolerance."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    state_a, state_b = read_checkpoint_state(a), read_checkpoint_state(b)
    for key in ("global_step", "job_step", "job_start_step", "epoch", "position", "scheduler", "config_hash",
                "config"):
        assert state_a[key] == state_b[key], key
    from safetensors.torch import load_file

    assert_bitwise_equal(load_file(str(a / "rng.safetensors")), load_file(str(b / "rng.safetensors")))
    optimizer_a, optimizer_b = load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors"))
    assert_close_weights(optimizer_a, optimizer_b)


# ------------------------------------------------------------------------------------------------ the data


def test_step_counts_are_what_collate_counts(tiny_hero_dir):
    data = TrainerEngine().prepare(chat_examples(), config(), model_path=str(tiny_hero_dir))
    counts = StepCounts(data.rows, data.train)
    picked = [3, 0, 5, 3]
    batch = collate([data.rows[r] for r in picked], data.train, data.pad_id)
    assert counts.of(picked) == (batch.num_tokens, batch.num_loss_tokens)
    assert counts.of([]) == (0, 0)


# -------------------------------------------------------------------------------------- same training, any width


def test_two_ranks_train_what_one_process_trains(gang, tiny_hero_dir, tmp_path):
    one, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "one", config())
    two, progress = train(gang, tiny_hero_dir, tmp_path / "two", config())
    assert two.status == "completed" and two.final_step == 4
    assert_same_trajectory(one, two)
    # Rank 0's progress reached the parent once per step, with the global step, loss and LR.
    assert [p[:4] for p in progress] == [(s, 4, loss, lr_at(s - 1, config().hyperparams))
                                         for s, loss in two.loss_history]
    # Written once (rank 0), atomically, at the same steps: the same checkpoints, the same content.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["step-00002", "step-00004"]
    same_checkpoint_content(Path(one.checkpoint_path), Path(two.checkpoint_path))
    assert_close_weights(load_weights(one.checkpoint_path), load_weights(two.checkpoint_path))


def test_a_campaign_continues_on_another_width(gang, tiny_hero_dir, tmp_path):
    """Job 1 on two ranks, job 2 on one process from job 1's checkpoint: the step, the LR schedule and the training
    continue as if the whole campaign had run on one process."""
    cfg = config(lr_scheduler="linear", warmup_steps=2, decay_steps=12)
    first, second = chat_examples(0, 24), chat_examples(24, 24)
    ref_1, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "ref1", cfg, data=first, run_id="j1")
    ref_2, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "ref2", cfg, data=second, run_id="j2",
                     resume_from=ref_1.checkpoint_path)

    job_1, _ = train(gang, tiny_hero_dir, tmp_path / "j1", cfg, data=first, run_id="j1")
    job_2, progress = train(TrainerEngine(), tiny_hero_dir, tmp_path / "j2", cfg, data=second, run_id="j2",
                            resume_from=job_1.checkpoint_path)
    assert (job_1.start_step, job_1.final_step, job_2.start_step, job_2.final_step) == (0, 4, 4, 8)
    assert [p[3] for p in progress] == [lr_at(s, cfg.hyperparams) for s in range(4, 8)]  # the schedule goes on
    assert_same_trajectory(ref_1, job_1)
    assert_same_trajectory(ref_2, job_2)
    assert_close_weights(load_weights(ref_2.checkpoint_path), load_weights(job_2.checkpoint_path))


def test_stopped_on_two_ranks_resumes_bitwise_on_two_ranks(gang, tiny_hero_dir, tmp_path):
    whole, _ = train(gang, tiny_hero_dir, tmp_path / "whole", config(max_steps=5), run_id="r")
    stopped, _ = train(gang, tiny_hero_dir, tmp_path / "split", config(max_steps=5), run_id="r", stop_after=2)
    assert stopped.status == "stopped" and stopped.final_step == 2  # every rank stopped after the same step
    resumed, _ = train(gang, tiny_hero_dir, tmp_path / "split", config(max_steps=5), run_id="r",
                       resume_from=stopped.checkpoint_path)
    assert resumed.status == "completed" and (resumed.start_step, resumed.final_step) == (2, 5)
    assert resumed.loss_history == whole.loss_history
    assert_bitwise_equal(load_weights(whole.checkpoint_path), load_weights(resumed.checkpoint_path))


def test_lora_on_two_ranks_trains_only_the_adapter_as_one_process(gang, tiny_hero_dir, tmp_path):
    from safetensors.torch import load_file

    one, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "one", lora(config(learning_rate=1e-2)))
    two, _ = train(gang, tiny_hero_dir, tmp_path / "two", lora(config(learning_rate=1e-2)))
    assert_same_trajectory(one, two)
    adapter = load_file(str(Path(two.checkpoint_path) / ADAPTER_WEIGHTS))
    assert adapter and all("lora_" in name for name in adapter)  # the checkpoint holds the adapter alone
    assert not (Path(two.checkpoint_path) / "model.safetensors").exists()
    # AdamW divides by the root of tiny second moments where an adapter's gradient is near zero (B starts at 0):
    # a rounding difference of the gradient there moves a weight by up to ~1% of one step (lr 1e-2).
    assert_close_weights(load_file(str(Path(one.checkpoint_path) / ADAPTER_WEIGHTS)), adapter, tolerance=1e-4)
    trained_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert trained_b and all(t.abs().max() > 0 for t in trained_b)  # B starts at zero: it trained


def test_sharded_fsdp_trains_what_one_process_trains(gang, tiny_hero_dir, tmp_path):
    one, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "one", config(sharding="fsdp"))
    two, _ = train(gang, tiny_hero_dir, tmp_path / "two", config(sharding="fsdp"))
    assert_same_trajectory(one, two)
    # Rank 0 gathered the full weights and optimizer state: the checkpoint is the one a single process writes.
    same_checkpoint_content(Path(one.checkpoint_path), Path(two.checkpoint_path))
    assert_close_weights(load_weights(one.checkpoint_path), load_weights(two.checkpoint_path))
    # ... and it resumes on two ranks, sharded again (the optimizer state split across the ranks once more), as on
    # one process.
    more, _ = train(gang, tiny_hero_dir, tmp_path / "more", config(sharding="fsdp"), run_id="next",
                    resume_from=two.checkpoint_path)
    more_one, _ = train(TrainerEngine(), tiny_hero_dir, tmp_path / "more1", config(sharding="fsdp"), run_id="next",
                        resume_from=two.checkpoint_path)
    assert (more.start_step, more.final_step) == (4, 8)
    assert_same_trajectory(more_one, more)


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_campaign_eval_set_on_two_ranks_gives_what_one_process_gives(gang, tiny_hero_dir, tmp_path, sharding):
    """Every rank evaluates the whole set alike (through the DDP/FSDP wrapper; probes on the full weights, gathered
    under FSDP): the same eval losses and probe answers as one process, reported once (rank 0's)."""
    from engine.eval_plan import EvalSpec, probes_from_examples
    from engine.formats import read_examples
    from tests.engine_fixtures import CHAT_SMALL

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(CHAT_SMALL.read_text().splitlines(keepends=True)[200:204]))
    spec = EvalSpec(str(eval_file), "sha-of-eval", 128, probes=tuple(probes_from_examples(read_examples(eval_file), 1)),
                    max_new_tokens=4, seed=3, at_start=True)
    cfg = config(max_steps=2, save_steps=2, eval_steps=1, sharding=sharding)
    results = []
    for engine, name in ((TrainerEngine(), "one"), (gang, "two")):
        points = []
        result = engine.run_job(chat_examples(), cfg, None, None, model_path=str(tiny_hero_dir),
                                checkpoint_dir=tmp_path / name, run_id="e", evaluation=spec, on_eval=points.append)
        assert [p.step for p in points] == [p.step for p in result.eval_history] == [0, 1, 2]
        results.append(points)
    one, two = results
    for a, b in zip(one, two):
        assert abs(a.loss - b.loss) <= TOLERANCE and a.num_loss_tokens == b.num_loss_tokens
        assert [x.text for x in a.answers] == [x.text for x in b.answers] and len(b.answers) == 1


# ------------------------------------------------------------------------------------------------ refusals


def test_a_width_that_does_not_divide_the_global_batch_is_refused_before_any_rank_starts(tiny_hero_dir, tmp_path):
    trainer = GangTrainer(2, "cpu")
    with pytest.raises(ConfigError, match="does not divide over 2 ranks"):
        train(trainer, tiny_hero_dir, tmp_path, config(batch_size=3, global_batch_size=9))
    assert trainer.pids() == []


def test_an_engine_error_in_the_ranks_is_raised_as_itself(gang, tiny_hero_dir, tmp_path):
    long_prompt = Example("messages", 1, messages=(("user", "context " * 200), ("assistant", "Short.")))
    with pytest.raises(DatasetInvalid):  # every reply falls beyond max_length: nothing to learn
        train(gang, tiny_hero_dir, tmp_path, config(max_length=32), data=[long_prompt] * 4)
    # The failed gang is gone; the next job starts a fresh one and trains.
    result, _ = train(gang, tiny_hero_dir, tmp_path / "after", config(max_steps=1))
    assert result.status == "completed" and gang.live_ranks() == 2


def test_fsdp_with_an_adapter_is_refused_by_the_config():
    from config.schema import check_config

    [problem] = check_config(lora(config(sharding="fsdp")))
    assert problem.startswith("hyperparams.sharding=fsdp shards full fine-tuning only")


def test_one_process_never_builds_a_data_parallel_wrapper(tiny_hero_dir, tmp_path):
    engine = TrainerEngine()
    train(engine, tiny_hero_dir, tmp_path, config(max_steps=1))
    assert engine._parallel is None and not torch.distributed.is_initialized()
