"""What a job trains, counted at enqueue (jobs/workload.py) with the tiny hero's own tokenizer: truncation at
max_length with the fix, tokens after truncation, steps; a one-line 30 MB file plans at the tokens it trains.
Then what enqueue says about it (stderr, never --json stdout) and keeps in the job record."""

from __future__ import annotations

import json

from campaigns.campaign import find_target
from jobs.job_plan import resolve_plan
from jobs.workload import estimate_workload
from tests.services import REPO

EXAMPLES = REPO / "examples"


def _plan(guild_home, sets=None):
    target = find_target(guild_home, "tiny-qwen3", None)
    return resolve_plan(guild_home, target.hero, target.name, None, sets or {})


def test_the_demo_data_at_the_tiny_heros_max_length(guild_home):
    workload = estimate_workload(EXAMPLES / "chat_small.jsonl", 240, _plan(guild_home), source="chat_small.jsonl")
    report = workload.truncation
    assert (report.num_examples, report.num_over, report.tokens_cut, report.counted, report.exact) == (
        240, 51, 9447, True, True)
    assert report.message == ("51 of 240 examples exceed max_length 256 (9,447 tokens cut); raise it with "
                              "--set max_length=1024 or shorten them")
    assert (workload.data_tokens, workload.train_tokens, workload.steps) == (31206, 29646, 29)
    longer = estimate_workload(EXAMPLES / "chat_small.jsonl", 240, _plan(guild_home, {"max_length": "1024"}))
    assert (longer.truncation.num_over, longer.truncation.tokens_cut) == (2, 58)


def test_max_steps_bound_the_tokens_a_job_trains(guild_home):
    workload = estimate_workload(EXAMPLES / "chat_small.jsonl", 240, _plan(guild_home, {"max_steps": "5"}))
    assert workload.steps == 5 and workload.train_tokens == round(5 * 29646 / 29)


def test_a_one_line_30_mb_file_plans_at_the_tokens_it_trains(guild_home, tmp_path):
    path = tmp_path / "oneline.jsonl"
    path.write_text(json.dumps({"text": "the harbor " * 2_800_000}) + "\n")
    assert path.stat().st_size > 30_000_000
    workload = estimate_workload(path, 1, _plan(guild_home), source="oneline.jsonl")
    assert (workload.steps, workload.train_tokens, workload.data_tokens) == (1, 256, 256)
    assert workload.truncation.num_over == 1 and not workload.exact  # the cut text is estimated, and sampled


def test_enqueue_reports_truncation_on_stderr_and_keeps_it_in_the_record(run_cli):
    out = run_cli("enqueue", str(EXAMPLES / "chat_small.jsonl"), "--json")
    assert out.returncode == 0, out.stderr
    [job] = json.loads(out.stdout)  # stdout is the JSON records only
    assert out.stderr.strip() == (f"warning: {EXAMPLES / 'chat_small.jsonl'}: 51 of 240 examples exceed max_length "
                                  "256 (9,447 tokens cut); raise it with --set max_length=1024 or shorten them")
    assert job["workload"]["truncation"]["num_over"] == 51 and job["workload"]["train_tokens"] == 29646
    fits = run_cli("enqueue", str(EXAMPLES / "prompt_response.jsonl"))
    assert fits.returncode == 0 and fits.stderr == ""
