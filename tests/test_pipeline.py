"""End to end: enqueue → real Redis → real worker process → trained checkpoint."""

import json
from datetime import datetime
from pathlib import Path

import pytest

from tests.services import REPO, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLES = REPO / "examples"
SHORT = ["--set", "max_steps=4", "--set", "save_steps=2", "--set", "max_length=128"]


def _enqueue(run_cli, *args):
    out = run_cli("enqueue", *args, "--json")
    assert out.returncode == 0, out.stderr
    return [j["id"] for j in json.loads(out.stdout)]


def _wait_final(store, job_ids, timeout_s=180):
    def done():
        jobs = [store.get(i) for i in job_ids]
        return jobs if all(j.status.value in ("completed", "failed", "skipped", "cancelled") for j in jobs) else None

    return wait_until(done, timeout_s, interval_s=0.5, what=f"jobs {job_ids} to finish")


def test_enqueue_to_completed_with_every_field(run_cli, start_worker, store, guild_home):
    worker = start_worker()
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "chat_small.jsonl"), "--priority", "high", *SHORT)
    [job] = _wait_final(store, [job_id])
    assert job.status.value == "completed", (job.last_error, worker.log()[-3000:])
    assert job.attempts == 1 and job.started_at and job.finished_at
    assert job.start_step == 0 and job.final_step == 4
    assert job.final_loss > 0 and job.final_val_loss > 0
    assert job.trained_tokens > 0 and job.tokens_per_sec > 0
    assert job.config_hash.startswith("sha256:") and len(job.config_hash) == 23
    assert job.progress is None and job.last_error is None
    checkpoint = Path(job.metadata["checkpoint"])
    assert (checkpoint / "model.safetensors").exists() or list(checkpoint.glob("*.safetensors"))
    plot = Path(job.artifacts["loss_plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    campaign_dir = guild_home / "campaigns" / "tiny-qwen3" / "main-tiny-qwen3"
    assert list((campaign_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    shown = json.loads(run_cli("jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "completed"
    history = [h["to"] for h in store.history(job_id)]
    assert history == ["queued", "processing", "completed"]


def test_strict_priority_high_then_normal_then_low(run_cli, start_worker, store, tmp_path):
    ids = {}
    for priority in ("low", "normal", "high"):
        path = tmp_path / f"{priority}.jsonl"
        path.write_text(json.dumps({"prompt": f"which queue? {priority}", "response": priority}) + "\n" * 2)
        [ids[priority]] = _enqueue(run_cli, str(path), "--priority", priority, "--campaign", f"prio-{priority}",
                                   "--set", "max_steps=2", "--set", "eval_fraction=0")
    start_worker()
    jobs = {p: j for p, j in zip(ids, _wait_final(store, list(ids.values())))}
    assert all(j.status.value == "completed" for j in jobs.values()), {p: j.last_error for p, j in jobs.items()}
    started = sorted(jobs, key=lambda p: datetime.fromisoformat(jobs[p].started_at))
    assert started == ["high", "normal", "low"]
