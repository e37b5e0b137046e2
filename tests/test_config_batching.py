"""The global batch: accumulation adapts to the number of ranks; a width that does not divide it is refused."""

import dataclasses

import pytest

from config.batching import BatchPlan, for_ranks, global_batch, plan_batch
from config.errors import ConfigError
from config.schema import Hyperparams, TrainerConfig


def hp(**values) -> Hyperparams:
    return Hyperparams(**values)


def test_without_a_global_batch_one_rank_keeps_todays_meaning():
    assert global_batch(hp(batch_size=4, gradient_accumulation_steps=3)) == 12
    assert plan_batch(hp(batch_size=4, gradient_accumulation_steps=3)) == BatchPlan(4, 1, 3)
    config = TrainerConfig(hyperparams=hp(batch_size=4, gradient_accumulation_steps=3))
    assert for_ranks(config, 1) is config  # same config, same hash


def test_accumulation_adapts_to_the_width_and_keeps_the_global_batch():
    h = hp(batch_size=2, global_batch_size=16, gradient_accumulation_steps=5)  # the global batch wins over 5
    plans = {n: plan_batch(h, n) for n in (1, 2, 4, 8)}
    assert {n: p.accumulation for n, p in plans.items()} == {1: 8, 2: 4, 4: 2, 8: 1}
    assert {p.global_batch for p in plans.values()} == {16}
    # No global batch: batch_size x accumulation is the global batch on any width.
    assert plan_batch(hp(batch_size=2, gradient_accumulation_steps=4), 2) == BatchPlan(2, 2, 2)


def test_for_ranks_writes_the_accumulation_and_is_idempotent():
    config = TrainerConfig(hyperparams=hp(batch_size=2, gradient_accumulation_steps=4))
    two = for_ranks(config, 2)
    assert (two.hyperparams.gradient_accumulation_steps, two.hyperparams.global_batch_size) == (2, 8)
    assert for_ranks(two, 2) == two
    one = for_ranks(two, 1)  # a campaign continued on one GPU after two
    assert (one.hyperparams.gradient_accumulation_steps, one.hyperparams.global_batch_size) == (4, 8)
    assert dataclasses.replace(one.hyperparams, global_batch_size=0) == config.hyperparams


def test_a_width_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ConfigError) as info:
        plan_batch(hp(batch_size=4, global_batch_size=8), 3)
    text = str(info.value)
    assert text.startswith("hyperparams.global_batch_size 8 does not divide over 3 ranks x batch_size 4")
    assert "set global_batch_size to a multiple of 12 (e.g. 12)" in text
    assert "it divides over 1, 2 rank(s)" in text
    with pytest.raises(ConfigError, match=r"the global batch 4 \(batch_size 4 x gradient_accumulation_steps 1\)"
                                          r".*or batch_size to 2"):
        plan_batch(hp(batch_size=4), 2)
