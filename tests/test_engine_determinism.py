"""engine.determinism: the switch sets torch's deterministic mode for a job and the next job's config sets it
back; a deterministic job resumes bitwise equal."""

from __future__ import annotations

import pytest
import torch

from engine import determinism
from engine.trainer import TrainerEngine
from tests.engine_fixtures import (
    assert_bitwise_equal,
    chat_examples,
    load_weights,
    one_torch_thread,  # noqa: F401 - a fixture
    small_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_switch_turns_deterministic_kernels_on_and_off():
    try:
        assert determinism.configure(True, torch.device("cpu")) == []
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic
    finally:
        determinism.configure(False, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_a_deterministic_job_stopped_and_resumed_is_bitwise_equal(tiny_hero_dir, tmp_path):
    config = small_config(max_steps=4, save_steps=100, deterministic=True)
    run = dict(model_path=str(tiny_hero_dir), run_id="det")
    try:
        straight = TrainerEngine().run_job(chat_examples(), config, checkpoint_dir=tmp_path / "a", **run)
        calls = []
        stopped = TrainerEngine().run_job(
            chat_examples(),
            config,
            lambda *a: calls.append(a[0]),
            lambda: 2 in calls,
            checkpoint_dir=tmp_path / "b",
            **run,
        )
        assert (stopped.status, stopped.final_step) == ("stopped", 2)
        resumed = TrainerEngine().run_job(
            chat_examples(), config, checkpoint_dir=tmp_path / "b", resume_from=stopped.checkpoint_path, **run
        )
    finally:
        determinism.configure(False, torch.device("cpu"))
    assert resumed.final_step == 4 and resumed.loss_history == straight.loss_history
    assert_bitwise_equal(load_weights(resumed.checkpoint_path), load_weights(straight.checkpoint_path))
