"""Campaigns through the CLI and real workers: steps continue, one worker per campaign, locked block."""

import json
import re
from datetime import datetime

import pytest

from tests.services import REPO, wait_until
from tests.test_pipeline import _enqueue, _wait_final

EXAMPLES = REPO / "examples"


def test_create_list_show_and_bad_name(run_cli):
    out = run_cli("campaigns", "create", "exp-1", "--hero", "tiny-qwen3", "--set", "learning_rate=0.01")
    assert out.returncode == 0, out.stderr
    shown = json.loads(run_cli("campaigns", "show", "exp-1", "--json").stdout)
    assert shown["hero_id"] == "tiny-qwen3" and shown["current_step"] == 0
    assert shown["config_overrides"] == {"hyperparams.learning_rate": 0.01}
    assert shown["locked"]["model_architecture"] == "Qwen3ForCausalLM" and shown["config_hash"].startswith("sha256:")
    assert "exp-1" in run_cli("campaigns", "list").stdout
    bad = run_cli("campaigns", "create", "../escape", "--hero", "tiny-qwen3")
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    again = run_cli("campaigns", "create", "exp-1", "--hero", "tiny-qwen3")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_explain_shows_each_layer_winning(run_cli, guild_home):
    run_cli("campaigns", "create", "layers", "--hero", "tiny-qwen3", "--set", "warmup_steps=7",
            "--set", "save_total_limit=5")
    (guild_home / "config.json").write_text(json.dumps({"hyperparams": {"save_total_limit": 9, "seed": 3}}))
    out = run_cli("config", "explain", "--campaign", "layers", "--set", "seed=11", "--json")
    assert out.returncode == 0, out.stderr
    table = json.loads(out.stdout)
    assert table["hyperparams.gradient_accumulation_steps"] == {"value": 1, "source": "defaults"}
    assert table["hyperparams.learning_rate"] == {"value": 0.002, "source": "hero"}
    assert table["hyperparams.warmup_steps"] == {"value": 7, "source": "campaign"}
    assert table["hyperparams.save_total_limit"] == {"value": 9, "source": "project"}
    assert table["hyperparams.seed"] == {"value": 11, "source": "cli"}


def test_explain_reports_every_bad_key_together(run_cli, guild_home):
    (guild_home / "config.json").write_text(json.dumps({"hyperparams": {"batch_size": "big"}, "nope": 1}))
    out = run_cli("config", "explain", "--set", "learning_rate=fast")
    assert out.returncode == 2
    assert "batch_size" in out.stderr and "nope" in out.stderr and "learning_rate" in out.stderr
    assert "config.json" in out.stderr and "project layer" in out.stderr and "cli layer" in out.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_show_and_list_include_the_running_jobs_steps(run_cli, start_worker, store, tmp_path):
    start_worker("gpu0@camplive", env={"GUILD_ENGINE_FACTORY": "tests.standin_engines:steady"})
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"), "--campaign", "live", "--set", "max_steps=400")
    wait_until(lambda: (store.get(job_id).progress or {}).get("step", 0) >= 5, 60, what="the job to reach step 5")
    shown = json.loads(run_cli("campaigns", "show", "live", "--json").stdout)
    running = shown["running"]
    assert shown["current_step"] == 0  # campaign.json moves when a job completes; the live step is beside it
    assert running["job"] == job_id and running["worker"] == "gpu0@camplive" and running["total_steps"] == 400
    assert running["step"] >= 5 and running["start_step"] == 0
    text = run_cli("campaigns", "show", "live").stdout
    assert re.search(rf"running: +running {job_id} on gpu0@camplive: step \d+/400 \(this job \d+ of 400\)", text)
    listed = run_cli("campaigns", "list").stdout
    assert re.search(rf"^live .* step 0 .*running {job_id} on gpu0@camplive: step \d+/400", listed, re.M), listed
    listed_json = json.loads(run_cli("campaigns", "list", "--json").stdout)
    assert next(c for c in listed_json if c["id"] == "live")["running"]["job"] == job_id
    assert run_cli("jobs", "cancel", job_id).returncode == 0
    _wait_final(store, [job_id])


@pytest.mark.integration
@pytest.mark.slow
def test_two_jobs_in_one_campaign_continue_the_step(run_cli, start_worker, store):
    start_worker()
    sets = ["--set", "max_steps=3", "--set", "eval_fraction=0", "--campaign", "cont"]
    [a] = _enqueue(run_cli, str(EXAMPLES / "messages.jsonl"), *sets)
    [b] = _enqueue(run_cli, str(EXAMPLES / "prompt_response.jsonl"), *sets)
    ja, jb = _wait_final(store, [a, b])
    assert ja.status.value == jb.status.value == "completed", (ja.last_error, jb.last_error)
    assert ja.start_step == 0 and ja.final_step == 3
    assert jb.start_step == ja.final_step and jb.final_step == 6
    campaign = json.loads(run_cli("campaigns", "show", "cont", "--json").stdout)
    assert campaign["current_step"] == 6 and campaign["latest_checkpoint"] == jb.metadata["checkpoint"]
    assert campaign["job_ids"] == [a, b]
    plotted = run_cli("campaigns", "show", "cont", "--plot")
    assert plotted.returncode == 0, plotted.stderr
    png = plotted.stdout.split("loss plot: ", 1)[1].splitlines()[0]
    assert open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_one_campaign_never_overlap(run_cli, start_worker, store, tmp_path):
    start_worker("gpu0@hostA")
    start_worker("gpu1@hostB")
    sets = ["--set", "max_steps=12", "--set", "eval_fraction=0", "--set", "max_length=128"]
    ids = []
    for i in range(3):
        path = tmp_path / f"a{i}.jsonl"
        extra = {"messages": [{"role": "user", "content": f"variant {i}?"}, {"role": "assistant", "content": "yes"}]}
        path.write_text((EXAMPLES / "messages.jsonl").read_text() + json.dumps(extra) + "\n")
        ids += _enqueue(run_cli, str(path), "--campaign", "shared", *sets)
    [other] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"), "--campaign", "other", *sets)
    jobs = _wait_final(store, ids + [other], timeout_s=300)
    assert all(j.status.value == "completed" for j in jobs), [j.last_error for j in jobs]
    shared, lone = jobs[:3], jobs[3]
    spans = [(datetime.fromisoformat(j.started_at), datetime.fromisoformat(j.finished_at)) for j in shared]
    for (_, e1), (s2, _) in zip(spans, spans[1:]):
        assert s2 >= e1, "two jobs of one campaign ran at once"
    assert [j.start_step for j in shared] == [0, 12, 24]  # queue order kept inside the campaign
    workers = {store.runtime(j.id).worker for j in jobs}
    assert workers == {"gpu0@hostA", "gpu1@hostB"}
    lone_start, lone_end = datetime.fromisoformat(lone.started_at), datetime.fromisoformat(lone.finished_at)
    assert any(lone_start < e and s < lone_end for s, e in spans), "the other campaign did not run in parallel"


@pytest.mark.integration
@pytest.mark.slow
def test_locked_mismatch_fails_before_training_naming_fields(run_cli, start_worker, store, guild_home):
    run_cli("campaigns", "create", "locked", "--hero", "tiny-qwen3")
    record = guild_home / "campaigns" / "tiny-qwen3" / "locked" / "campaign.json"
    data = json.loads(record.read_text())
    data["locked"]["vocab_size"] = 8192  # as if the hero profile had been edited since the campaign began
    record.write_text(json.dumps(data))
    # Enqueue resolves the plan, so it refuses the job at once, naming the fields.
    refused = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--campaign", "locked")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "vocab_size" in refused.stderr and "8192" in refused.stderr and "4096" in refused.stderr
    assert store.list() == []
    # A campaign record edited after the job was enqueued: the worker checks again and fails it before training.
    data["locked"]["vocab_size"] = 4096
    record.write_text(json.dumps(data))
    [job_id] = _enqueue(run_cli, str(EXAMPLES / "text.jsonl"), "--campaign", "locked")
    data["locked"]["vocab_size"] = 8192
    record.write_text(json.dumps(data))
    start_worker()
    [job] = _wait_final(store, [job_id])
    assert job.status.value == "failed"
    assert "vocab_size" in job.last_error and "8192" in job.last_error and "4096" in job.last_error
    assert job.final_step is None
