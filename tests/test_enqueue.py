"""``python -m enqueue`` against a real Redis (no worker: messages stay in their queues)."""

import json
import subprocess
import sys

from jobs.queues import PRIORITIES, celery_key
from tests.services import REPO

EXAMPLES = REPO / "examples"


def _queue_lengths(client):
    return {q: client.llen(celery_key(q)) for q in PRIORITIES}


def test_enqueue_creates_job_and_message(run_cli, redis_client, guild_home):
    out = run_cli("enqueue", str(EXAMPLES / "chat_small.jsonl"), "--priority", "high", "--json")
    assert out.returncode == 0, out.stderr
    [record] = json.loads(out.stdout)
    assert record["status"] == "queued" and record["priority"] == "high"
    assert record["num_examples"] == 240 and record["estimated_tokens"] > 1000
    assert record["hero_id"] == "tiny-qwen3" and record["campaign_id"] == "main-tiny-qwen3"
    assert record["id"].endswith("_chat_small") and ":" not in record["id"]
    # trained from a content-addressed copy, not the user's file
    assert record["dataset_path"].startswith(str(guild_home / "datasets"))
    assert _queue_lengths(redis_client) == {"high": 1, "normal": 0, "low": 0}
    shown = run_cli("jobs", "show", record["id"], "--json")
    assert json.loads(shown.stdout)["id"] == record["id"]


def test_bad_file_refused_with_its_line_and_nothing_enqueued(run_cli, redis_client, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "p"}\n')
    out = run_cli("enqueue", str(good), str(bad), "--priority", "low")
    assert out.returncode == 2
    assert f"{bad}:2:" in out.stderr and "Traceback" not in out.stderr
    assert _queue_lengths(redis_client) == {"high": 0, "normal": 0, "low": 0}
    assert run_cli("jobs", "list", "--json").stdout.strip() == "[]"


def test_missing_file_and_directory_named(run_cli, tmp_path):
    out = run_cli("enqueue", str(tmp_path / "nope.jsonl"), str(tmp_path))
    assert out.returncode == 2
    assert str(tmp_path / "nope.jsonl") in out.stderr and "no such file" in out.stderr
    assert "directory" in out.stderr


def test_duplicate_refused_unless_force(run_cli):
    path = str(EXAMPLES / "text.jsonl")
    first = run_cli("enqueue", path)
    assert first.returncode == 0, first.stderr
    again = run_cli("enqueue", path)
    assert again.returncode == 2 and first.stdout.strip() in again.stderr and "--force" in again.stderr
    forced = run_cli("enqueue", path, "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != first.stdout.strip()


def test_bad_set_key_refused(run_cli, redis_client):
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--set", "learning_rat=1")
    assert out.returncode == 2 and "learning_rat" in out.stderr and "cli" in out.stderr
    assert _queue_lengths(redis_client)["normal"] == 0


def test_redis_down_is_one_clear_line(run_cli):
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), extra_env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == 1 and "Redis" in out.stderr and "Traceback" not in out.stderr


def test_unknown_job_exit_2(run_cli):
    out = run_cli("jobs", "show", "no-such-job")
    assert out.returncode == 2 and "no-such-job" in out.stderr


def test_enqueue_path_never_imports_torch(guild_env):
    code = ("import sys, enqueue; rc = enqueue.main([sys.argv[1], '--force']); "
            "assert rc == 0, rc; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "messages.jsonl")], cwd=REPO, env=guild_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_jobs_show_prints_the_frozen_plan(run_cli, guild_home):
    (guild_home / "config.json").write_text(json.dumps({"hyperparams": {"seed": 7}}))
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--set", "learning_rate=0.01",
                  "--set", "queue.max_attempts=5", "--json")
    assert out.returncode == 0, out.stderr
    [record] = json.loads(out.stdout)
    plan = record["plan"]
    assert plan["config_hash"] == record["config_hash"] and plan["hero"]["id"] == "tiny-qwen3"
    assert plan["config"]["hyperparams"]["learning_rate"] == 0.01 and plan["queue"]["max_attempts"] == 5
    assert plan["sources"]["hyperparams.learning_rate"] == "cli" and plan["sources"]["hyperparams.seed"] == "project"
    assert plan["sources"]["hyperparams.max_length"] == "hero" and plan["locked"]["vocab_size"] == 4096
    assert plan["model_path"] == str(guild_home / "heroes" / "tiny-qwen3") and plan["hub_name"] == "guild/tiny-qwen3"
    shown = run_cli("jobs", "show", record["id"])
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "plan (resolved at enqueue" in text and record["config_hash"] in text
    line = next(x for x in text.splitlines() if "hyperparams.seed" in x)
    assert line.split()[1:3] == ["7", "project"] and str(guild_home / "config.json") in line
    assert json.loads(run_cli("jobs", "show", record["id"], "--json").stdout)["plan"] == plan


def test_a_corrupted_key_refuses_the_enqueue_and_leaves_nothing(run_cli, redis_client, guild_home):
    """A Guild key of the wrong type (a task sent to a queue named after it): one line, exit 2, nothing written."""
    redis_client.rpush("guild:jobs:queued", "junk")
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "guild:jobs:queued is a list, not a zset" in out.stderr and "nothing was written" in out.stderr
    left = sorted(k.decode() for k in redis_client.keys("guild:*"))
    assert left == ["guild:jobs:queued"] and _queue_lengths(redis_client)["normal"] == 0
    assert not (guild_home / "datasets").exists() and not (guild_home / "campaigns").exists()
    ran = run_cli("doctor", "--json", timeout=60)
    assert ran.stdout.startswith("{"), ran.stderr[-3000:]
    doctor = json.loads(ran.stdout)
    layout = next(c for c in doctor["checks"] if c["name"] == "redis-layout")
    assert not layout["ok"] and "guild:jobs:queued is a list" in layout["detail"] and not doctor["healthy"]


def test_preempt_needs_priority_high(run_cli, redis_client):
    out = run_cli("enqueue", str(EXAMPLES / "text.jsonl"), "--preempt")
    assert out.returncode == 2 and "--preempt" in out.stderr and "add --priority high" in out.stderr
    assert _queue_lengths(redis_client) == {"high": 0, "normal": 0, "low": 0}
