"""jobs.datasets: the content-addressed store copies by streaming, checks the hash, and leaves nothing half-done."""

from __future__ import annotations

import hashlib

import pytest

from jobs.datasets import DatasetChanged, store_dataset, stored_path


def test_a_file_is_copied_under_its_hash(tmp_path):
    source = tmp_path / "a.jsonl"
    data = b'{"text": "x"}\n' * 100_000  # 1.4 MB: more than one copy chunk
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    target = store_dataset(tmp_path / "home", sha, source)
    assert target == stored_path(tmp_path / "home", sha) and target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left
    assert store_dataset(tmp_path / "home", sha, data) == target  # bytes still work; the copy is kept


def test_a_file_changed_after_validation_is_not_stored(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_bytes(b'{"text": "validated"}\n')
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    source.write_bytes(b'{"text": "edited!!!"}\n')  # same size, other content
    with pytest.raises(DatasetChanged, match="changed while it was being enqueued"):
        store_dataset(tmp_path / "home", sha, source)
    assert list(stored_path(tmp_path / "home", sha).parent.iterdir()) == []
