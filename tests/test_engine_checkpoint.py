"""engine.checkpoint: atomic step directories, only complete ones are seen, old ones pruned, no pickles."""

from __future__ import annotations

import os

import pytest
import torch

from engine import checkpoint as ckpt
from engine.errors import CheckpointError
from tests.engine_fixtures import one_torch_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tiny_hero_dir):
    """The tiny model and an AdamW optimizer that has taken one step (so it has state)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hero_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 4096, (1, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    return model, optimizer, tokenizer


def save(directory, step, trained, limit=3):
    model, optimizer, tokenizer = trained
    return ckpt.save_checkpoint(
        directory, step, model, optimizer, tokenizer, {"global_step": step, "run_id": "r"}, save_total_limit=limit
    )


def test_checkpoint_holds_safetensors_and_json_only(tmp_path, trained):
    path = save(tmp_path, 7, trained)
    assert path.name == "step-00007" and ckpt.is_complete(path)
    names = {p.name for p in path.iterdir()}
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "rng.json",
        "trainer_state.json",
        "config.json",
        "COMPLETE",
    } <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))]
    assert ckpt.read_checkpoint_state(path)["global_step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_optimizer_state_round_trips_exactly(tmp_path, trained):
    model, optimizer, _ = trained
    path = save(tmp_path, 1, trained)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.load_optimizer_state(path, fresh)
    before, after = optimizer.state_dict(), fresh.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][index][name]), (index, name)


def test_rng_round_trips(tmp_path, trained):
    import random

    path = save(tmp_path, 1, trained)
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    ckpt.restore_rng(path)
    # The states were captured at save time, before `expected` was drawn.
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_incomplete_directories_are_ignored(tmp_path, trained):
    good = save(tmp_path, 2, trained)
    (tmp_path / ".tmp-step-00009").mkdir()  # a save killed half-way
    (tmp_path / ".tmp-step-00009" / "model.safetensors").write_bytes(b"partial")
    unmarked = tmp_path / "step-00010"  # e.g. copied by hand without its marker
    unmarked.mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint_state(unmarked)
    ckpt.remove_stale_temp_dirs(tmp_path)
    assert not (tmp_path / ".tmp-step-00009").exists()


def test_a_save_killed_before_its_rename_leaves_no_checkpoint(tmp_path, trained, monkeypatch):
    good = save(tmp_path, 2, trained)

    def killed(src, dst):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, trained)
    monkeypatch.setattr(ckpt.os, "rename", os.rename)
    assert (tmp_path / ".tmp-step-00004").exists()
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_save_total_limit_keeps_the_newest(tmp_path, trained):
    for step in (2, 4, 6):
        save(tmp_path, step, trained, limit=2)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00006"


def test_saving_an_existing_step_keeps_it(tmp_path, trained):
    first = save(tmp_path, 3, trained)
    stamp = (first / "COMPLETE").read_text()
    assert save(tmp_path, 3, trained) == first
    assert (first / "COMPLETE").read_text() == stamp


def test_latest_of_a_missing_directory_is_none(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "nope") is None


def test_non_finite_weights_are_never_saved(tmp_path, trained):
    """A NaN weight (e.g. from a NaN learning rate) must not become a checkpoint a campaign continues from."""
    model = trained[0]
    weight = next(p for name, p in model.named_parameters() if name.endswith("embed_tokens.weight"))
    kept = weight.data[0, 0].item()
    weight.data[0, 0] = float("nan")
    try:
        with pytest.raises(CheckpointError, match=r"refusing to save step-00005: non-finite weights .*embed_tokens"):
            save(tmp_path, 5, trained)
    finally:
        weight.data[0, 0] = kept
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp directory
    assert ckpt.is_complete(save(tmp_path, 5, trained))
