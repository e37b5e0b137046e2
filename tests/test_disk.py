"""campaigns.disk: the size of the next checkpoints, whether they fit, when doctor warns, byte formatting."""

from __future__ import annotations

from collections import namedtuple

import pytest

from campaigns import disk
from campaigns.campaign import Campaign
from campaigns.errors import DiskSizeError, InsufficientDisk
from jobs.job import JobStatus
from tests.test_engine_checkpoint_layout import fake_checkpoint
from tests.test_retention import FULL


def test_estimate_from_the_model_and_from_the_latest_checkpoint(tiny_hero_dir, tmp_path):
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(tiny_hero_dir / "model.safetensors")).values())
    campaign = Campaign(id="e", hero_id="tiny-qwen3")
    estimate = disk.estimate_checkpoint_bytes(campaign, tiny_hero_dir)
    others = sum(p.stat().st_size for p in tiny_hero_dir.iterdir() if p.is_file() and p.suffix != ".safetensors")
    assert estimate == params * 12 + others
    campaign.latest_checkpoint = str(fake_checkpoint(tmp_path, 4))
    assert disk.estimate_checkpoint_bytes(campaign, tiny_hero_dir) == FULL


Usage = namedtuple("Usage", "total used free")


def test_a_job_without_room_for_its_checkpoints_is_refused_with_the_figures(tmp_path, monkeypatch):
    campaign = Campaign(id="small", hero_id="tiny-qwen3", latest_checkpoint=str(fake_checkpoint(tmp_path, 4)))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    job_dir = tmp_path / "job-1"
    with pytest.raises(InsufficientDisk) as caught:
        disk.ensure_checkpoint_space(job_dir, campaign, None, save_total_limit=2)
    text = str(caught.value)
    assert f"needs {disk.format_bytes(3 * FULL)} (3 checkpoint(s) of {disk.format_bytes(FULL)}" in text
    assert "5.0 kB is free" in text and "python -m campaigns prune small" in text
    assert "python -m jobs retry job-1" in text
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10**9, 0, 3 * FULL))
    assert disk.ensure_checkpoint_space(job_dir, campaign, None, save_total_limit=2) == 3 * FULL
    fake_checkpoint(job_dir, 1)  # a resumed job already holds one of its own
    assert disk.ensure_checkpoint_space(job_dir, campaign, None, save_total_limit=2) == 2 * FULL


def test_low_disk_threshold():
    assert disk.low_disk_threshold(1000 * 10**9, 10**9) == 100 * 10**9  # 10% of the file system
    assert disk.low_disk_threshold(100 * 10**9, 5 * 10**9) == 15 * 10**9  # three checkpoints
    assert disk.low_disk_threshold(200 * 10**9, 0, "15%") == 30 * 10**9
    assert disk.low_disk_threshold(0, 0, "50G") == 50 * 10**9
    assert disk.low_disk_threshold(0, 0, "800M") == 800 * 10**6
    with pytest.raises(DiskSizeError, match="--min-free 'lots'"):
        disk.low_disk_threshold(0, 0, "lots")


def test_format_bytes():
    assert [disk.format_bytes(n) for n in (0, 999, 1000, 1_900_000_000, 3 * 10**13)] == [
        "0 B", "999 B", "1.0 kB", "1.9 GB", "30.0 TB"]


def test_a_job_is_refused_when_its_checkpoints_would_not_fit(store, guild_env, monkeypatch):
    from config.settings import get_settings
    from jobs.submit import SubmitRequest, submit
    from tasks.engines import TorchEngine
    from tasks.lifecycle import JobRunner
    from tests.services import REPO

    class NeverCalled(TorchEngine):  # materialises the model like the real engine; must never train
        def run_job(self, *args, **kwargs):
            raise AssertionError("the engine must not start")

    [job] = submit(get_settings(), store, SubmitRequest([str(REPO / "examples" / "text.jsonl")]), lambda *a: None)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 10**6, 10**6))
    outcome = JobRunner(get_settings(), store, "gpu0@t", engine=NeverCalled()).run(job.id, lambda *a, **k: None)
    failed = store.get(job.id)
    assert outcome.action == "failed" and failed.status is JobStatus.FAILED
    assert "not enough disk space" in failed.last_error and "1.0 MB is free" in failed.last_error
    assert "python -m campaigns prune main-tiny-qwen3" in failed.last_error
