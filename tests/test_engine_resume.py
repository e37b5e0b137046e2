"""Resuming: a job stopped or killed after a checkpoint and resumed ends bitwise equal to an uninterrupted run;
a new job from another job's checkpoint continues the campaign (step, optimizer, LR schedule) with its own data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import engine.trainer as trainer_module
from engine.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint_state
from engine.schedule import lr_at
from engine.trainer import TrainerEngine
from tests.engine_fixtures import (
    REPO,
    assert_bitwise_equal,
    chat_examples,
    load_weights,
    one_torch_thread,  # noqa: F401 - a fixture
    small_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recorder:
    """on_progress and should_stop for a test: records every call, asks to stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple] = []
        self.stop_after = stop_after

    def __call__(self, *args):
        self.calls.append(args)

    def should_stop(self) -> bool:
        return self.stop_after is not None and bool(self.calls) and self.calls[-1][0] >= self.stop_after


def run(engine, tiny_hero_dir, directory, config, data=None, **kwargs):
    recorder = kwargs.pop("recorder", None) or Recorder()
    result = engine.run_job(
        data if data is not None else chat_examples(),
        config,
        recorder,
        recorder.should_stop,
        model_path=str(tiny_hero_dir),
        checkpoint_dir=directory,
        **kwargs,
    )
    return result, recorder


@pytest.fixture(scope="module")
def uninterrupted(tiny_hero_dir, tmp_path_factory):
    """The reference: six steps in one go."""
    result, _ = run(TrainerEngine(), tiny_hero_dir, tmp_path_factory.mktemp("straight"), small_config(), run_id="job")
    assert result.status == "completed" and result.final_step == 6
    return result


def test_stop_then_resume_is_bitwise_equal_to_uninterrupted(tiny_hero_dir, tmp_path, uninterrupted):
    config = small_config()
    stopped, recorder = run(TrainerEngine(), tiny_hero_dir, tmp_path, config, run_id="job", recorder=Recorder(3))
    assert stopped.status == "stopped" and stopped.final_step == 3 and stopped.error is None
    assert stopped.final_val_loss is None  # a stop saves at once; validation waits for the job to complete
    assert stopped.checkpoint_path == str(tmp_path / "step-00003")
    assert read_checkpoint_state(stopped.checkpoint_path)["job_step"] == 3

    # A fresh engine (a new process after a crash, in effect): everything comes from the checkpoint.
    resumed, recorder = run(
        TrainerEngine(), tiny_hero_dir, tmp_path, config, run_id="job", resume_from=latest_checkpoint(tmp_path)
    )
    assert resumed.status == "completed"
    assert (resumed.start_step, resumed.final_step, resumed.total_steps) == (3, 6, 6)
    assert [c[0] for c in recorder.calls] == [4, 5, 6]
    assert [s for s, _ in resumed.loss_history] == [1, 2, 3, 4, 5, 6]
    assert resumed.loss_history == uninterrupted.loss_history
    assert_bitwise_equal(load_weights(resumed.checkpoint_path), load_weights(uninterrupted.checkpoint_path))


def test_a_resume_at_the_jobs_final_checkpoint_trains_nothing_and_reports_its_last_loss(
        tiny_hero_dir, tmp_path, uninterrupted):
    """A worker killed after the final checkpoint, before the job was marked completed: the retry finds the job
    done; its record still gets the loss of the job's last step."""
    done, _ = run(TrainerEngine(), tiny_hero_dir, tmp_path, small_config(), run_id="job")
    again, recorder = run(TrainerEngine(), tiny_hero_dir, tmp_path, small_config(), run_id="job",
                          resume_from=latest_checkpoint(tmp_path))
    assert again.status == "completed" and (again.start_step, again.final_step) == (6, 6) and recorder.calls == []
    assert again.final_loss == done.final_loss == uninterrupted.final_loss


def test_warm_resume_in_the_same_engine_is_bitwise_equal(tiny_hero_dir, tmp_path, uninterrupted):
    engine = TrainerEngine()
    config = small_config()
    stopped, _ = run(engine, tiny_hero_dir, tmp_path, config, run_id="job", recorder=Recorder(4))
    model = engine._model
    resumed, _ = run(engine, tiny_hero_dir, tmp_path, config, run_id="job", resume_from=stopped.checkpoint_path)
    assert engine._model is model  # not reloaded
    assert_bitwise_equal(load_weights(resumed.checkpoint_path), load_weights(uninterrupted.checkpoint_path))


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from engine.trainer import TrainerEngine
    from tests.engine_fixtures import chat_examples, small_config

    torch.set_num_threads(int(sys.argv[3]))  # the parent's: bitwise equality needs the same reduction order
    def slow_progress(step, *rest):
        time.sleep(0.2)  # room for the parent to kill us between checkpoints
    TrainerEngine().run_job(chat_examples(), small_config(), slow_progress, model_path=sys.argv[1],
                            checkpoint_dir=Path(sys.argv[2]), run_id="job")
""")


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_equal(tiny_hero_dir, tmp_path, uninterrupted):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(tiny_hero_dir), str(directory), str(torch.get_num_threads())],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while latest_checkpoint(directory) is None:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    checkpoint = latest_checkpoint(directory)
    killed_at = read_checkpoint_state(checkpoint)["global_step"]
    assert killed_at < 6

    resumed, _ = run(TrainerEngine(), tiny_hero_dir, directory, small_config(), run_id="job", resume_from=checkpoint)
    assert resumed.start_step == killed_at and resumed.final_step == 6
    assert_bitwise_equal(load_weights(resumed.checkpoint_path), load_weights(uninterrupted.checkpoint_path))


def test_campaign_continues_step_optimizer_and_lr_schedule_across_jobs(tiny_hero_dir, tmp_path):
    # warmup spans both jobs: a schedule restarted per job would show the second job's LR back at the bottom.
    config = small_config(warmup_steps=8, max_steps=4, save_steps=100)
    engine = TrainerEngine()
    job1, _ = run(engine, tiny_hero_dir, tmp_path / "job1", config, data=chat_examples(0, 24), run_id="job1")
    assert job1.status == "completed" and job1.final_step == 4
    warm_model = engine._model

    job2, recorder = run(
        engine,
        tiny_hero_dir,
        tmp_path / "job2",
        config,
        data=chat_examples(24, 24),
        run_id="job2",
        resume_from=job1.checkpoint_path,
    )
    assert engine._model is warm_model  # the warm engine did not reload
    assert job2.status == "completed"
    assert job2.start_step == job1.final_step == 4
    assert (job2.final_step, job2.total_steps) == (8, 8)
    steps = [c[0] for c in recorder.calls]
    lrs = [c[3] for c in recorder.calls]
    assert steps == [5, 6, 7, 8] and all(c[1] == 8 for c in recorder.calls)
    assert lrs == [lr_at(s - 1, config.hyperparams) for s in steps]
    assert lrs[0] > lr_at(0, config.hyperparams) * 4  # no warmup restart
    state = read_checkpoint_state(job2.checkpoint_path)
    assert (state["global_step"], state["job_step"], state["run_id"]) == (8, 4, "job2")
    assert [s for s, _ in job2.loss_history] == [5, 6, 7, 8]  # its own data, from its own start

    # A cold engine continuing the same campaign from disk gets the same weights: the optimizer state and the
    # RNG came with the checkpoint, not from memory.
    cold, _ = run(
        TrainerEngine(),
        tiny_hero_dir,
        tmp_path / "job2-cold",
        config,
        data=chat_examples(24, 24),
        run_id="job2",
        resume_from=job1.checkpoint_path,
    )
    assert_bitwise_equal(load_weights(cold.checkpoint_path), load_weights(job2.checkpoint_path))
    optimizer = json.loads((tmp_path / "job2-cold" / "step-00008" / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["lr"] == lrs[-1]


def test_stop_before_any_step_saves_nothing(tiny_hero_dir, tmp_path):
    result = TrainerEngine().run_job(
        chat_examples(),
        small_config(),
        None,
        lambda: True,
        model_path=str(tiny_hero_dir),
        checkpoint_dir=tmp_path,
        run_id="job",
    )
    assert result.status == "stopped" and result.final_step == 0 and result.checkpoint_path is None
    assert list_checkpoints(tmp_path) == []


def test_non_finite_loss_fails_and_keeps_the_last_good_checkpoint(tiny_hero_dir, tmp_path, monkeypatch):
    real = trainer_module.loss_sum
    calls = []

    def poisoned(model, batch, *args):  # micro-batches 1..4 are fine; the fifth (step 5) returns NaN
        calls.append(1)
        value = real(model, batch, *args)
        return value * math.nan if len(calls) == 5 else value

    monkeypatch.setattr(trainer_module, "loss_sum", poisoned)
    engine = TrainerEngine()
    result, recorder = run(engine, tiny_hero_dir, tmp_path, small_config(), run_id="job")
    assert result.status == "failed"
    assert "step 5" in result.error and "non-finite" in result.error
    assert result.final_step == 4 and [c[0] for c in recorder.calls] == [1, 2, 3, 4]
    assert result.final_loss == recorder.calls[-1][2]  # the last good step's, not the NaN
    assert result.checkpoint_path == str(tmp_path / "step-00004")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert engine._warm_checkpoint is None
    weights = load_weights(result.checkpoint_path)
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The loss is read back a step late, but the bad step was skipped on the device (and the next one computed
    # meanwhile was dropped): the model in memory is still exactly the last good step's.
    in_memory = engine._model.state_dict()
    assert_bitwise_equal(weights, {name: in_memory[name] for name in weights})
