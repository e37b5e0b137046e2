"""TrainerEngine.run_job end to end on the tiny hero: it learns, reports every step, validates, and goes from
one job of a campaign to the next without a pause."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

from engine.errors import DatasetInvalid, ModelLoadError
from engine.formats import Example
from engine.trainer import TrainerEngine
from tests.engine_fixtures import CHAT_SMALL, REPO, chat_examples, one_torch_thread, small_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_loss_goes_down_over_two_epochs(tiny_hero_dir, tmp_path):
    config = small_config(
        max_length=256,
        batch_size=4,
        max_steps=0,
        epochs=2.0,
        warmup_steps=5,
        save_steps=1000,
        eval_fraction=0.05,
        eval_max_examples=20,
    )
    dataset = tmp_path / "part.jsonl"  # a third of chat_small, as a file: two epochs in a few seconds
    dataset.write_text("".join(CHAT_SMALL.read_text().splitlines(keepends=True)[:80]))
    calls = []
    result = TrainerEngine().run_job(
        dataset,
        config,
        lambda *a: calls.append(a),
        model_path=str(tiny_hero_dir),
        checkpoint_dir=tmp_path / "ckpt",
        run_id="learn",
    )
    assert result.status == "completed" and result.error is None
    losses = [loss for _, loss in result.loss_history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0
    assert result.final_val_loss is not None and result.final_val_loss < losses[0] - 2.0
    assert (result.num_examples, result.num_val_examples, result.num_train_examples) == (80, 4, 76)
    assert result.num_dropped == 0 and result.num_truncated > 0
    assert result.checkpoint_path == str(tmp_path / "ckpt" / f"step-{result.final_step:05d}")

    # on_progress after every step, with sane values.
    assert [c[0] for c in calls] == list(range(1, result.total_steps + 1))
    for _, total, loss, lr, tokens_per_sec, eta_s in calls:
        assert total == result.total_steps and loss > 0 and 0 < lr <= 2e-3 and tokens_per_sec > 0 and eta_s >= 0
    assert calls[-1][5] == 0
    assert result.trained_tokens > 0 and result.tokens_per_sec > 0


def test_validation_every_eval_steps_and_at_the_end(tiny_hero_dir, tmp_path):
    result = TrainerEngine().run_job(
        chat_examples(),
        small_config(max_steps=4, eval_steps=2),
        None,
        None,
        model_path=str(tiny_hero_dir),
        checkpoint_dir=tmp_path,
        run_id="val",
    )
    assert [step for step, _ in result.val_history] == [2, 4]
    assert result.final_val_loss == result.val_history[-1][1]
    assert result.num_val_examples == 2


def test_packing_switch_overrides_the_config(tiny_hero_dir, tmp_path):
    engine = TrainerEngine()
    config = small_config(max_steps=2)
    packed = engine.prepare(chat_examples(), config, model_path=str(tiny_hero_dir))
    unpacked = engine.prepare(chat_examples(), config, model_path=str(tiny_hero_dir), enable_packing=False)
    assert packed.packed and not unpacked.packed
    assert len(unpacked.rows) == len(unpacked.train) > len(packed.rows)
    result = engine.run_job(
        chat_examples(),
        config,
        model_path=str(tiny_hero_dir),
        checkpoint_dir=tmp_path,
        run_id="nopack",
        enable_packing=False,
    )
    assert result.status == "completed" and result.final_val_loss is not None


@pytest.mark.slow
def test_next_job_of_a_campaign_starts_within_a_second(tiny_hero_dir, tmp_path):
    """Warm model, next dataset prepared on a background thread while the previous job trains.

    The gap is the end of one job's last optimizer step to the start of the next job's first: the final
    validation and checkpoint of the one, the setup of the other. Three jobs give two gaps; the smaller is held to
    the 1 s budget (other processes on a shared two-core machine can stretch any one wall-clock figure).
    """
    config = small_config(max_length=256, batch_size=4, max_steps=3, save_steps=1000, eval_max_examples=20)
    engine = TrainerEngine()
    parts = [chat_examples(0, 80), chat_examples(80, 80), chat_examples(160, 80)]
    engine.prepare(parts[0], config, model_path=str(tiny_hero_dir))
    results, gaps, returned, resume_from = [], [], 0.0, None
    for i, part in enumerate(parts):
        if i + 1 < len(parts):
            background = threading.Thread(
                target=engine.prepare, args=(parts[i + 1], config), kwargs={"model_path": str(tiny_hero_dir)}
            )
            background.start()
        called = time.perf_counter()
        result = engine.run_job(
            part,
            config,
            model_path=str(tiny_hero_dir),
            checkpoint_dir=tmp_path / f"job{i}",
            resume_from=resume_from,
            run_id=f"job{i}",
        )
        if results:
            gaps.append(results[-1].teardown_s + (called - returned) + result.setup_s)
        returned = time.perf_counter()
        if i + 1 < len(parts):
            background.join()
        results.append(result)
        resume_from = result.checkpoint_path
    logging.getLogger(__name__).info(
        "inter-job gaps %s s (teardowns %s, setups %s)",
        [f"{g:.3f}" for g in gaps],
        [f"{r.teardown_s:.3f}" for r in results],
        [f"{r.setup_s:.3f}" for r in results],
    )
    assert [r.start_step for r in results] == [0, 3, 6] and all(r.status == "completed" for r in results)
    assert min(gaps) <= 1.0, f"gaps {gaps}"


def test_gradient_accumulation_matches_one_bigger_batch(tiny_hero_dir, tmp_path):
    """Two micro-batches of one row and one micro-batch of two rows give the same token-weighted step loss."""
    results = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        config = small_config(max_steps=2, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        results.append(
            TrainerEngine().run_job(
                chat_examples(),
                config,
                model_path=str(tiny_hero_dir),
                checkpoint_dir=tmp_path / f"ga{accumulation}",
                run_id="ga",
            )
        )
    for (_, one), (_, two) in zip(results[0].loss_history, results[1].loss_history):
        assert one == pytest.approx(two, abs=1e-5)


def test_verbose_logs_every_step(tiny_hero_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="engine.trainer"):
        TrainerEngine(verbose=True).run_job(
            chat_examples(),
            small_config(max_steps=3),
            None,
            None,
            model_path=str(tiny_hero_dir),
            checkpoint_dir=tmp_path,
            run_id="v",
        )
    steps = [r.getMessage() for r in caplog.records if " step " in r.getMessage() and "loss" in r.getMessage()]
    assert len(steps) == 3


def test_unusable_data_raises_dataset_invalid(tiny_hero_dir, tmp_path):
    long_prompt = Example("messages", 1, messages=(("user", "context " * 200), ("assistant", "Short.")))
    with pytest.raises(DatasetInvalid):
        TrainerEngine().run_job(
            [long_prompt] * 3,
            small_config(max_length=32),
            model_path=str(tiny_hero_dir),
            checkpoint_dir=tmp_path,
            run_id="bad",
        )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DatasetInvalid, match="broken.jsonl:1"):
        TrainerEngine().run_job(broken, small_config(), model_path=str(tiny_hero_dir), checkpoint_dir=tmp_path)


def test_missing_model_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        TrainerEngine().run_job(
            chat_examples(), small_config(), model_path=str(tmp_path / "nope"), checkpoint_dir=tmp_path / "ckpt"
        )


def test_importing_engine_does_not_import_torch():
    code = "import sys, engine, engine.formats; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_activation_checkpointing_carries_the_document_layout(tiny_hero_dir, tmp_path):
    """Recomputed layers get the same document layout: the losses are those of the run without it."""
    results = [
        TrainerEngine().run_job(
            chat_examples(),
            small_config(max_steps=2, gradient_checkpointing=checkpointing),
            model_path=str(tiny_hero_dir),
            checkpoint_dir=tmp_path / str(checkpointing),
            run_id="ac",
        )
        for checkpointing in (False, True)
    ]
    (plain, recomputed) = ([loss for _, loss in r.loss_history] for r in results)
    assert recomputed == pytest.approx(plain, abs=1e-6)
