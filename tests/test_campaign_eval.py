"""A campaign's eval set end to end through real workers: two jobs evaluated on the same examples at the steps
asked for, one curve across both, the probes' answers stored per evaluation and given again by the checkpoint,
and ``compare`` of base weights, checkpoints and the same checkpoint twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.services import REPO
from tests.test_pipeline import _enqueue, _wait_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHAT = (REPO / "examples" / "chat_small.jsonl").read_text().splitlines(keepends=True)
JOB = ["--campaign", "evc", "--set", "max_steps=4", "--set", "eval_steps=2"]


def test_two_jobs_one_eval_set_one_curve_samples_and_compare(run_cli, start_worker, store, guild_home, tmp_path):
    eval_file, part_a, part_b = tmp_path / "eval.jsonl", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    eval_file.write_text("".join(CHAT[:10]))  # the eval set is part of the training data
    part_a.write_text("".join(CHAT[:40]))
    part_b.write_text("".join(CHAT[40:80]))
    created = run_cli("campaigns", "create", "evc", "--hero", "tiny-qwen3", "--eval-file", str(eval_file),
                      "--num-probes", "2", "--max-new-tokens", "8", "--set", "max_length=128",
                      "--set", "eval_fraction=0", "--set", "save_steps=2", "--set", "learning_rate=0.004")
    assert created.returncode == 0, created.stderr
    sha = json.loads(run_cli("campaigns", "show", "evc", "--json").stdout)["eval_sets"][0]["eval_set"]["sha256"]
    worker = start_worker()
    [a] = _enqueue(run_cli, str(part_a), *JOB)
    [b] = _enqueue(run_cli, str(part_b), *JOB, "--set", "max_length=64")  # the eval set keeps its own 128
    ja, jb = _wait_final(store, [a, b], timeout_s=300)
    assert ja.status.value == jb.status.value == "completed", (ja.last_error, jb.last_error, worker.log()[-3000:])

    # ---- both jobs on the same examples, at the steps asked for (and the campaign's baseline at step 0) ----------
    points = {j.id: j.metadata["eval_history"] for j in (ja, jb)}
    assert [p["step"] for p in points[a]] == [0, 2, 4] and [p["step"] for p in points[b]] == [6, 8]
    assert len({(p["num_examples"], p["num_loss_tokens"], p["eval_set"]) for p in points[a] + points[b]}) == 1
    assert points[a][0]["num_examples"] == 10 and points[a][0]["eval_set"] == sha
    assert points[b][-1]["loss"] < points[a][0]["loss"]
    for job in (ja, jb):
        assert job.metadata["eval_set"]["sha256"] == sha and job.final_eval_loss == job.metadata["eval_history"][-1][
            "loss"]
        assert job.eval_s > 0 and job.train_s > 0 and job.tokens_per_sec == pytest.approx(
            job.trained_tokens / job.train_s)
    shown = run_cli("jobs", "show", b).stdout
    assert f"eval_set:          {sha[:12]}" in shown and "eval_points:       step 6 " in shown

    # ---- one curve: the plot's data holds both jobs on one axis, with the boundary -------------------------------
    plotted = run_cli("campaigns", "show", "evc", "--plot")
    assert plotted.returncode == 0, plotted.stderr
    png = Path(plotted.stdout.split("loss plot: ", 1)[1].splitlines()[0])
    assert png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(png.with_suffix(".json").read_text())
    assert [j["id"] for j in data["jobs"]] == [a, b] and data["boundaries"] == [4]
    assert [p[0] for p in data["series"][f"eval {sha[:12]}"]] == [0, 2, 4, 6, 8]
    assert [p[0] for p in data["series"]["train"]] == list(range(1, 9)) and data["series"]["validation"] == []
    events = b"".join(p.read_bytes() for p in (guild_home / "campaigns" / "tiny-qwen3" / "evc" / "tensorboard").rglob(
        "events.out.tfevents.*"))
    assert b"eval/loss" in events and b"samples/probe-1" in events

    # ---- probe answers per evaluation: `samples` shows them over the steps -------------------------------------
    samples = json.loads(run_cli("campaigns", "samples", "evc", "--json").stdout)
    [group] = samples["eval_sets"]
    assert [e["step"] for e in group["evaluations"]] == [0, 2, 4, 6, 8]
    assert [p["index"] for p in group["probes"]] == [0, 1]
    assert all([a_["step"] for a_ in p["answers"]] == [0, 2, 4, 6, 8] for p in group["probes"])
    assert group["probes"][0]["reference"] == json.loads(CHAT[0])["messages"][-1]["content"]
    one = run_cli("campaigns", "samples", "evc", "--prompt", "1")
    assert one.returncode == 0 and "probe 1 (line 2)" in one.stdout and "probe 0" not in one.stdout
    final_answers = [p["answers"][-1]["text"] for p in group["probes"]]

    # ---- compare: the same checkpoint twice; the base weights against what the campaign trained ------------------
    same = run_cli("campaigns", "compare", "evc", "evc@8", "--json", timeout=300)
    assert same.returncode == 0, same.stderr
    same = json.loads(same.stdout)
    assert same["a"]["loss"] == same["b"]["loss"] and same["a"]["step"] == same["b"]["step"] == 8
    # ...and the checkpoint gives the answers the worker stored at that step (same seed).
    assert [x["text"] for x in same["a"]["answers"]] == final_answers
    assert same["a"]["loss"] == pytest.approx(points[b][-1]["loss"], rel=1e-4)
    base = json.loads(run_cli("campaigns", "compare", "evc@base", "evc@4", "--json", timeout=300).stdout)
    assert base["b"]["loss"] < base["a"]["loss"] and base["loss_difference"] < 0
    assert base["a"]["loss"] == pytest.approx(points[a][0]["loss"], rel=1e-4)  # the step-0 baseline
    missing = run_cli("campaigns", "compare", "evc@3", "evc")
    assert missing.returncode == 2 and "keeps no checkpoint step-00003" in missing.stderr
    assert "Traceback" not in missing.stderr
