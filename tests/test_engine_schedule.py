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
