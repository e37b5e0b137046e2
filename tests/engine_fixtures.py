"""Helpers shared by the engine tests: small configs, the shipped examples, weight comparison.

The tiny hero itself comes from the session fixture ``tiny_hero_dir`` in conftest.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from config.schema import DataConfig, Hyperparams, TrainerConfig
from engine.formats import Example, read_examples

REPO = Path(__file__).resolve().parent.parent
CHAT_SMALL = REPO / "examples" / "chat_small.jsonl"


def small_config(packing: bool = True, **hyperparams) -> TrainerConfig:
    """A config that trains the tiny hero in well under a second per step on two CPU cores."""
    base = dict(
        max_length=128,
        batch_size=2,
        learning_rate=2e-3,
        lr_scheduler="constant_with_warmup",
        warmup_steps=2,
        max_steps=6,
        save_steps=2,
        save_total_limit=3,
        eval_fraction=0.1,
        eval_max_examples=4,
        seed=7,
    )
    base.update(hyperparams)
    return TrainerConfig(hyperparams=Hyperparams(**base), data=DataConfig(enable_packing=packing))


def replace_hp(config: TrainerConfig, **changes) -> TrainerConfig:
    return dataclasses.replace(config, hyperparams=dataclasses.replace(config.hyperparams, **changes))


def chat_examples(start: int = 0, count: int = 24) -> list[Example]:
    return read_examples(CHAT_SMALL)[start : start + count]


def load_weights(checkpoint: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Train on one CPU thread: the tiny model's matmuls gain nothing from a second one, and on a shared machine
    a second thread waiting for a busy core makes every step slower (the suite ran in 34 s instead of 82 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
