"""engine.schedule: the LR is a function of the global step only."""

from __future__ import annotations

import math

import pytest

from config.schema import Hyperparams
from engine.schedule import lr_at


def hp(**kwargs) -> Hyperparams:
    return Hyperparams(learning_rate=1.0, **kwargs)


def test_constant_ignores_warmup():
    assert [lr_at(s, hp(lr_scheduler="constant", warmup_steps=5)) for s in (0, 3, 100)] == [1.0, 1.0, 1.0]


def test_warmup_reaches_the_full_rate_on_its_last_step_and_never_starts_at_zero():
    h = hp(lr_scheduler="constant_with_warmup", warmup_steps=4)
    assert [lr_at(s, h) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_decay_reaches_zero_at_decay_steps(name):
    h = hp(lr_scheduler=name, warmup_steps=2, decay_steps=12)
    lrs = [lr_at(s, h) for s in range(15)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[7] == pytest.approx(0.5)  # halfway through the decay, for both shapes
    assert lrs[12:] == [0.0, 0.0, 0.0]


def test_cosine_shape():
    h = hp(lr_scheduler="cosine", warmup_steps=0, decay_steps=10)
    assert lr_at(2, h) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_no_decay_steps_means_constant_after_warmup():
    assert lr_at(1000, hp(lr_scheduler="cosine", warmup_steps=2, decay_steps=0)) == 1.0


# ---- schedules that cannot be right are refused; an LR at 0 is reported -----------------------------------------


@pytest.mark.parametrize("decay", [3, 10])
def test_decay_steps_not_after_warmup_is_refused_with_the_keys_and_the_fix(decay):
    from config.errors import ConfigError
    from config.layers import Layer, resolve

    sets = {"lr_scheduler": "cosine", "warmup_steps": "10", "decay_steps": str(decay)}
    with pytest.raises(ConfigError) as caught:
        resolve([Layer("cli", sets, "--set", from_text=True)])
    (problem,) = caught.value.problems
    assert problem.startswith(f"hyperparams.decay_steps={decay} (cli layer) must be greater than ")
    assert "hyperparams.warmup_steps=10 (cli layer)" in problem and "or to 0 for no decay" in problem


@pytest.mark.parametrize(
    "sets",
    [
        {"lr_scheduler": "linear", "warmup_steps": "10", "decay_steps": "0"},  # no decay
        {"lr_scheduler": "linear", "warmup_steps": "10", "decay_steps": "11"},
        {"lr_scheduler": "constant_with_warmup", "warmup_steps": "10", "decay_steps": "5"},  # decay_steps unused
    ],
)
def test_sound_schedules_pass(sets):
    from config.layers import Layer, resolve

    resolve([Layer("cli", sets, "--set", from_text=True)])


def test_warnings_when_the_campaign_lr_reaches_zero():
    from engine.schedule import schedule_warnings

    h = hp(lr_scheduler="linear", warmup_steps=2, decay_steps=100)
    assert schedule_warnings(h, 0, 100) == []  # the last step (index 99) still has a positive LR
    (during,) = schedule_warnings(h, 90, 120)
    assert "reaches 0 at step 100" in during and "steps 101-120 do not change the weights" in during
    (after,) = schedule_warnings(h, 100, 110)
    assert "reached 0 at step 100" in after and "runs steps 101-110" in after
    assert "hyperparams.decay_steps" in after
    assert schedule_warnings(hp(lr_scheduler="cosine", decay_steps=0), 500, 600) == []  # no decay
    assert schedule_warnings(hp(lr_scheduler="constant_with_warmup", decay_steps=50), 60, 70) == []
    assert "learning_rate is 0" in schedule_warnings(Hyperparams(learning_rate=0.0), 0, 5)[0]


def test_a_job_past_decay_steps_carries_the_warning(tiny_hero_dir, tmp_path):
    from engine.trainer import TrainerEngine
    from tests.engine_fixtures import chat_examples, small_config

    config = small_config(max_steps=2, lr_scheduler="linear", warmup_steps=0, decay_steps=1, save_steps=100)
    result = TrainerEngine().run_job(
        chat_examples(), config, model_path=str(tiny_hero_dir), checkpoint_dir=tmp_path, run_id="lr0"
    )
    assert result.status == "completed"
    assert len(result.warnings) == 1 and "reaches 0 at step 1" in result.warnings[0]
