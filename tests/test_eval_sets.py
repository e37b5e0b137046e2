"""A campaign's eval set through the CLI (jobs/eval_sets.py, campaigns/eval_set.py): validated like any dataset,
stored content-addressed, recorded with the step it changed at, checked against every token budget; a bad file or
option changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from campaigns.errors import CampaignError
from tests.services import REPO

EXAMPLES = REPO / "examples"


def _record(guild_home: Path, name: str) -> dict:
    return json.loads((guild_home / "campaigns" / "tiny-qwen3" / name / "campaign.json").read_text())


def _eval_file(tmp_path: Path, lines: int = 6) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join((EXAMPLES / "chat_small.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return path


def test_create_with_an_eval_file_records_it_at_step_0(run_cli, guild_home, tmp_path):
    eval_file = _eval_file(tmp_path)
    out = run_cli("campaigns", "create", "ev", "--hero", "tiny-qwen3", "--eval-file", str(eval_file),
                  "--num-probes", "2", "--max-new-tokens", "16", "--set", "max_length=128")
    assert out.returncode == 0, out.stderr
    assert "from step 0" in out.stdout and "6 messages examples" in out.stdout and "2 probes" in out.stdout
    [change] = _record(guild_home, "ev")["eval_sets"]
    eval_set = change["eval_set"]
    assert change["from_step"] == 0 and eval_set["source"] == str(eval_file)
    stored = Path(eval_set["path"])
    assert stored == guild_home / "datasets" / eval_set["sha256"][:2] / f"{eval_set['sha256']}.jsonl"
    assert stored.read_bytes() == eval_file.read_bytes()
    assert eval_set["tokens_counted"] and eval_set["max_length"] == 128 and 0 < eval_set["num_tokens"] <= 6 * 128
    probes = [json.loads(line) for line in Path(eval_set["probes_path"]).read_text().splitlines()]
    first = json.loads(eval_file.read_text().splitlines()[0])["messages"]
    assert probes[0]["messages"] == first and len(probes) == 2  # the prompt, then the file's reply as reference
    assert (eval_set["num_probes"], eval_set["max_new_tokens"], eval_set["probes_source"]) == (2, 16, "eval file")
    # `eval-set NAME` shows the history; `show` names the set.
    assert "from step 0" in run_cli("campaigns", "eval-set", "ev").stdout
    assert eval_set["sha256"][:12] in run_cli("campaigns", "show", "ev").stdout


def test_a_bad_eval_file_names_file_and_line_and_changes_nothing(run_cli, guild_home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "Hi?", "response": "Hello."})
    bad.write_text(f'{good}\n{{"prompt": "no response"}}\nnot json\n')
    created = run_cli("campaigns", "create", "bad", "--hero", "tiny-qwen3", "--eval-file", str(bad))
    assert created.returncode == 2 and "Traceback" not in created.stderr
    assert f"{bad}:2:" in created.stderr and f"{bad}:3:" in created.stderr
    assert not (guild_home / "campaigns" / "tiny-qwen3" / "bad").exists()

    assert run_cli("campaigns", "create", "keep", "--hero", "tiny-qwen3", "--eval-file",
                   str(_eval_file(tmp_path))).returncode == 0
    record = guild_home / "campaigns" / "tiny-qwen3" / "keep" / "campaign.json"
    before = record.read_bytes()
    replaced = run_cli("campaigns", "eval-set", "keep", str(bad))
    assert replaced.returncode == 2 and f"{bad}:2:" in replaced.stderr and "Traceback" not in replaced.stderr
    text_probes = tmp_path / "probes.jsonl"
    text_probes.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    probes = run_cli("campaigns", "eval-set", "keep", str(_eval_file(tmp_path)), "--probes", str(text_probes))
    assert probes.returncode == 2 and f"{text_probes}:1: a text line has no prompt" in probes.stderr
    options = run_cli("campaigns", "eval-set", "keep", str(_eval_file(tmp_path)), "--num-probes", "17")
    assert options.returncode == 2 and "--num-probes 17: use 0 to 16" in options.stderr
    assert record.read_bytes() == before


def test_replacing_and_removing_records_the_step(run_cli, guild_home, tmp_path):
    from campaigns.campaign import CampaignStore

    assert run_cli("campaigns", "create", "hist", "--hero", "tiny-qwen3").returncode == 0
    assert "has no eval set" in run_cli("campaigns", "eval-set", "hist").stdout
    with CampaignStore(guild_home).edit("hist") as campaign:
        campaign.current_step = 40  # as if jobs had trained 40 steps
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                              for i in range(3)))
    out = run_cli("campaigns", "eval-set", "hist", str(_eval_file(tmp_path)), "--probes", str(probes))
    assert out.returncode == 0, out.stderr
    assert "from step 40" in out.stdout and "applies to every job that starts from now on" in out.stdout
    with CampaignStore(guild_home).edit("hist") as campaign:
        campaign.current_step = 70
    assert run_cli("campaigns", "eval-set", "hist", "--clear").returncode == 0
    history = _record(guild_home, "hist")["eval_sets"]
    assert [(c["from_step"], c["eval_set"] is None) for c in history] == [(40, False), (70, True)]
    assert history[0]["eval_set"]["num_probes"] == 3 and history[0]["eval_set"]["probes_source"] == str(probes)


def test_token_budget_refused_at_create_set_and_enqueue_with_the_numbers(run_cli, guild_home, tmp_path, store):
    eval_file = _eval_file(tmp_path)
    small = run_cli("campaigns", "create", "tight", "--hero", "tiny-qwen3", "--eval-file", str(eval_file),
                    "--set", "eval_max_tokens=50")
    assert small.returncode == 2 and "hyperparams.eval_max_tokens allows 50 per evaluation" in small.stderr
    assert not (guild_home / "campaigns" / "tiny-qwen3" / "tight").exists()

    assert run_cli("campaigns", "create", "budget", "--hero", "tiny-qwen3", "--eval-file",
                   str(eval_file)).returncode == 0
    tokens = _record(guild_home, "budget")["eval_sets"][0]["eval_set"]["num_tokens"]
    refused = run_cli("enqueue", str(EXAMPLES / "messages.jsonl"), "--campaign", "budget",
                      "--set", f"eval_max_tokens={tokens - 1}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"has {tokens:,} tokens at max_length 256" in refused.stderr
    assert f"allows {tokens - 1:,} per evaluation" in refused.stderr and f"eval_max_tokens={tokens}" in refused.stderr
    assert store.list() == []

    # A queued job whose budget a new set would exceed: the change is refused, naming the job.
    queued = run_cli("enqueue", str(EXAMPLES / "messages.jsonl"), "--campaign", "budget", "--json",
                     "--set", f"eval_max_tokens={tokens}")
    assert queued.returncode == 0, queued.stderr
    [job_id] = [j["id"] for j in json.loads(queued.stdout)]
    bigger = _eval_file(tmp_path, lines=12)
    before = _record(guild_home, "budget")
    changed = run_cli("campaigns", "eval-set", "budget", str(bigger))
    assert changed.returncode == 2 and f"queued job {job_id}" in changed.stderr and "nothing changed" in changed.stderr
    assert _record(guild_home, "budget") == before


def test_eval_set_commands_do_not_import_torch(guild_env, tmp_path):
    eval_file = _eval_file(tmp_path)
    code = ("import sys, campaigns.__main__ as cli\n"
            f"assert cli.main(['create', 'light', '--hero', 'tiny-qwen3', '--eval-file', {str(eval_file)!r}]) == 0\n"
            "assert cli.main(['eval-set', 'light']) == 0\n"
            "assert cli.main(['samples', 'light']) == 0\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=guild_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no evaluation recorded yet" in out.stdout


def test_samples_and_compare_text(guild_home, tmp_path):
    """What `campaigns samples` and `campaigns compare` print, from a log and a comparison made by hand."""
    from campaigns.campaign import CampaignStore, new_campaign
    from campaigns.compare import Comparison, ModelRef, Side
    from campaigns.eval_set import EvalSet, record_change
    from campaigns.eval_view import collect_samples, format_comparison, format_samples
    from campaigns.evaluations import append_evaluation, read_log
    from engine.eval_plan import EvalPoint, Probe, ProbeAnswer
    from heroes.profile import load_hero

    hero = load_hero("tiny-qwen3", guild_home)
    campaign = new_campaign(guild_home, hero, "view", {})
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps(Probe((("user", "2+2?"),), "4").to_line()) + "\n")
    eval_set = EvalSet("ab" * 32, str(tmp_path / "e.jsonl"), "/data/e.jsonl", "messages", 3, 90, True, 128,
                       "cd" * 32, str(probes), 1, "eval file")
    record_change(campaign, eval_set)
    CampaignStore(guild_home).create(campaign)
    directory = CampaignStore(guild_home).directory("tiny-qwen3", "view")
    for step, text in ((0, ""), (2, "5"), (4, "5"), (4, "4"), (6, "4\nfour")):  # step 4 written twice: the last wins
        append_evaluation(directory, "job-1", EvalPoint(step, 3.0 - step / 10, 3, 42, 0.1, eval_set.sha256,
                                                         (ProbeAnswer(0, text, 2, step != 6),)))
    view = collect_samples(CampaignStore(guild_home).get("view"), read_log(directory))
    text = format_samples("view", view)
    assert "eval set abababababab (/data/e.jsonl) · 4 evaluations, steps 0-6" in text
    assert 'probe 0 (line 1): "2+2?"' in text and 'reference  "4"' in text
    assert 'step        2  "5"' in text and 'step        4  "4"' in text and "(same as before)" not in text
    assert 'step        6  "4\\nfour" [cut at max_new_tokens]' in text
    with pytest.raises(CampaignError, match="--prompt 3: the campaign's evaluations have probes 0 to 0"):
        collect_samples(CampaignStore(guild_home).get("view"), read_log(directory), prompt=3)

    ref = ModelRef("view@base", campaign, hero, None, 0)
    other = ModelRef("view", campaign, hero, Path("/ck/step-00006"), 6)
    result = Comparison("/data/e.jsonl", eval_set.sha256, 128, (Probe((("user", "2+2?"),), "4"),),
                        Side(ref, EvalPoint(0, 3.0, 3, 42, 0.5, "x", (ProbeAnswer(0, "", 2, False),)), 90),
                        Side(other, EvalPoint(6, 2.5, 3, 42, 0.4, "x", (ProbeAnswer(0, "4", 2, True),)), 90))
    shown = format_comparison(result)
    assert "A: view@base" in shown and "B: view" in shown and "(B - A: -0.5000)" in shown
    assert '  A: ""' in shown and '  B: "4"' in shown and "reference: \"4\"" in shown
