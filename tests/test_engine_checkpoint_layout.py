"""engine.checkpoint_layout: finding checkpoints without torch, their sizes, crash-safe deleting and stripping."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from engine import checkpoint_layout as layout
from engine.errors import CheckpointError
from tests.services import REPO

FILES = {"model.safetensors": 1000, "config.json": 10, "tokenizer.json": 100, "trainer_state.json": 20,
         "optimizer.safetensors": 2000, "optimizer.json": 30, "rng.safetensors": 40, "rng.json": 50}


def fake_checkpoint(directory, step, files=FILES):
    """A complete ``step-N`` directory with files of known sizes (bytes of zeros)."""
    path = directory / layout.checkpoint_name(step)
    path.mkdir(parents=True)
    for name, size in files.items():
        (path / name).write_bytes(b"\0" * size)
    (path / layout.MARKER_FILE).write_text("{}")
    return path


def test_importing_the_layout_does_not_import_torch():
    code = "import engine.checkpoint_layout, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_sizes(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    assert layout.path_bytes(path) == sum(FILES.values()) + 2  # + the COMPLETE marker's "{}"
    assert layout.training_state_bytes(path) == 2000 + 30 + 40 + 50
    assert layout.path_bytes(tmp_path / "missing") == 0


def test_strip_to_weights_keeps_a_loadable_model_and_marks_it(tmp_path):
    path = fake_checkpoint(tmp_path, 5)
    assert not layout.is_weights_only(path)
    assert layout.strip_to_weights(path) == 2120
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "WEIGHTS_ONLY", "config.json", "model.safetensors",
                                                      "tokenizer.json", "trainer_state.json"]
    assert layout.is_weights_only(path) and layout.is_complete(path)
    assert layout.strip_to_weights(path) == 0  # idempotent


def test_strip_finishes_an_interrupted_strip(tmp_path):
    path = fake_checkpoint(tmp_path, 5)
    (path / layout.WEIGHTS_ONLY_MARKER).write_text("{}")  # the marker went down, then the process died
    (path / "optimizer.json").rename(path / ".trash-optimizer.json")
    assert layout.strip_to_weights(path) == 2120
    assert not [p for p in path.iterdir() if p.name.startswith((".trash", "optimizer", "rng"))]


def test_strip_refuses_an_incomplete_checkpoint(tmp_path):
    path = fake_checkpoint(tmp_path, 5)
    (path / layout.MARKER_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        layout.strip_to_weights(path)


def test_a_delete_killed_midway_never_leaves_a_complete_looking_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes the weights, then the process dies
        (path / "model.safetensors").unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        layout.prune_checkpoints(tmp_path, keep=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    for _, path in layout.list_checkpoints(tmp_path):
        assert (path / "model.safetensors").exists(), f"{path} looks complete but lost its weights"
    assert [s for s, _ in layout.list_checkpoints(tmp_path)] == [2, 3]
    assert layout.trash_bytes(tmp_path) > 0
    assert layout.remove_trash(tmp_path) == sum(FILES.values()) + 2 - 1000  # the weights were already gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00002", "step-00003"]


def test_discarding_a_missing_checkpoint_frees_nothing(tmp_path):
    assert layout.discard_checkpoint(tmp_path / "step-00009") == 0
