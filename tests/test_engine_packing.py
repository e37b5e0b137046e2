"""engine.packing: rows respect their capacity, positions restart per example, each batch says where its examples
lie, and a packed example's loss is exactly its loss alone (no attention across examples, no target across the
boundary). The attention paths themselves are tested in test_engine_attention.py."""

from __future__ import annotations

import pytest
import torch

from engine.loss import per_example_losses
from engine.packing import collate, pack_best_fit
from engine.tokenize import IGNORE_INDEX, tokenize_examples
from tests.engine_fixtures import chat_examples, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_hero_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hero_dir)


@pytest.fixture(scope="module")
def model(tiny_hero_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hero_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def guild_model(tiny_hero_dir):
    """The tiny hero with Guild's document attention, as the engine runs it."""
    from transformers import AutoModelForCausalLM

    from engine.attention import install

    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir, dtype=torch.float32).eval()
    install(model, packed=True)
    return model


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_examples(chat_examples(0, 12), tokenizer, max_length=128).examples


def test_best_fit_respects_capacity_and_places_every_example_once():
    lengths = [50, 10, 90, 30, 30, 70, 5, 100, 60, 20]
    rows = pack_best_fit(lengths, capacity=100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 5  # 465 tokens: at least 5 rows of 100, and best fit finds 5
    assert rows == pack_best_fit(lengths, capacity=100)  # deterministic


def test_best_fit_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError):
        pack_best_fit([10, 101], capacity=100)


def test_position_ids_restart_and_boundary_targets_are_masked(examples):
    batch = collate([[0, 1, 2]], examples, pad_id=0, length=sum(len(examples[i]) for i in range(3)) + 5)
    lengths = [len(examples[i]) for i in range(3)]
    expected_positions = [p for n in lengths for p in range(n)] + list(range(lengths[-1], lengths[-1] + 5))
    assert batch.position_ids[0].tolist() == expected_positions
    assert batch.example_index[0].tolist() == [i for i, n in enumerate(lengths) for _ in range(n)] + [-1] * 5
    assert batch.num_tokens == sum(lengths)
    # The last position of every example has no target: the next example's first token is never predicted.
    targets = torch.full((batch.input_ids.numel(),), IGNORE_INDEX)
    targets[batch.loss_positions] = batch.loss_targets
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (targets[ends] == IGNORE_INDEX).all()
    assert (targets[sum(lengths) :] == IGNORE_INDEX).all()  # padding


def test_packed_losses_equal_one_by_one_losses(model, guild_model, examples):
    rows = pack_best_fit([len(e) for e in examples], capacity=256)
    assert any(len(row) > 1 for row in rows)
    with torch.no_grad():
        packed = per_example_losses(guild_model, collate(rows, examples, pad_id=0))
        alone = {i: per_example_losses(model, collate([[i]], examples, pad_id=0))[i] for i in range(len(examples))}
    assert packed.keys() == alone.keys()
    for i in alone:
        assert packed[i] == pytest.approx(alone[i], abs=1e-5), i


def test_batch_lists_each_rows_examples(examples):
    batch = collate([[0, 1], [2]], examples, pad_id=0)
    assert batch.documents == ((len(examples[0]), len(examples[1])), (len(examples[2]),))
    assert batch.input_ids.shape == (2, max(len(examples[0]) + len(examples[1]), len(examples[2])))


def test_without_document_boundaries_examples_would_see_each_other(guild_model, examples):
    """The equality above is not vacuous: the same row read as one sequence (no boundary) changes the second
    example's loss and not the first's."""
    batch = collate([[0, 1]], examples, pad_id=0)
    with torch.no_grad():
        separate = per_example_losses(guild_model, batch)
        batch.documents = ((batch.input_ids.shape[1],),)  # one causal pass over the whole row
        mixed = per_example_losses(guild_model, batch)
    assert abs(separate[1] - mixed[1]) > 1e-3
    assert separate[0] == pytest.approx(mixed[0], abs=1e-5)
