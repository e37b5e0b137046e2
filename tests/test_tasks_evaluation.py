"""Which eval set a job evaluates on and where its evaluations go (tasks/evaluation.py, tasks/lifecycle.py), without
Redis: the set is the campaign's at the job's first start and stays the job's; a changed set applies from the next
job, with a baseline at its first step; evaluations reach the campaign's log, the job record and live progress."""

from __future__ import annotations

import dataclasses
import json

import pytest

from campaigns.campaign import CampaignStore
from campaigns.evaluations import read_log
from config.settings import Settings
from engine.eval_plan import EvalPoint, ProbeAnswer
from jobs.eval_sets import EvalSetRequest, set_eval_set
from jobs.memory_store import MemoryJobStore
from jobs.submit import SubmitRequest, submit
from tasks.engines import StandInEngine
from tasks.evaluation import EvalReporter, job_evaluation
from tasks.lifecycle import JobRunner, OutcomeKind
from tests.services import REPO

EXAMPLES = REPO / "examples"


class EvalEngine(StandInEngine):
    """A stand-in that reports one evaluation at step 2 and one at the end, as the real engine would."""

    def __init__(self):
        super().__init__(step_s=0.001)
        self.specs = []

    def run_job(self, dataset_path, config, on_progress, should_stop, *, evaluation=None, on_eval=None, **kw):
        self.specs.append(evaluation)
        points = []

        def progress(step, *args):
            if evaluation is not None and step in (2, 4):
                points.append(EvalPoint(step, 3.0 - step / 4, 6, 120, 0.05, evaluation.name,
                                        (ProbeAnswer(0, f"answer at {step}", 3, True),)))
                on_eval(points[-1])
            on_progress(step, *args)

        result = super().run_job(dataset_path, config, progress, should_stop, **kw)
        return dataclasses.replace(result, eval_history=points, final_eval_loss=points[-1].loss if points else None,
                                   eval_s=0.1, train_s=0.5)


class Publisher:
    def __call__(self, job_id, priority, at_head=False):
        pass


@pytest.fixture
def settings(tmp_path):
    return Settings(guild_home=tmp_path / "home", redis_url="redis://127.0.0.1:1/0", heartbeat_stale_s=60.0)


@pytest.fixture
def store(settings):
    return MemoryJobStore(settings.guild_home)


def _eval_file(tmp_path, lines=6):
    path = tmp_path / f"eval-{lines}.jsonl"
    path.write_text("".join((EXAMPLES / "chat_small.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return str(path)


def _enqueue(settings, store, campaign="ev"):
    [job] = submit(settings, store, SubmitRequest([str(EXAMPLES / "text.jsonl")], campaign=campaign,
                                                  sets={"max_steps": "4"}, force=True), Publisher())
    return job


def test_a_job_keeps_the_set_it_started_with_and_a_new_set_gets_a_baseline(settings, store, tmp_path):
    job = _enqueue(settings, store)
    campaigns = CampaignStore(settings.guild_home)
    assert job_evaluation(job, campaigns.get("ev"), None, 0, tmp_path / "ck").spec is None
    first = set_eval_set(settings, store, "ev", EvalSetRequest(_eval_file(tmp_path), num_probes=2)).eval_set
    started = job_evaluation(job, campaigns.get("ev"), None, 0, tmp_path / "ck")
    assert started.spec.name == first.sha256 and started.spec.at_start  # first job on the set: a baseline
    assert [p.line for p in started.spec.probes] == [1, 2] and started.record == first.to_record()
    assert started.spec.max_tokens == job.plan.config.hyperparams.eval_max_tokens

    # Resumed with the set recorded in its metadata: that set, whatever the campaign says now; no second baseline.
    second = set_eval_set(settings, store, "ev", EvalSetRequest(_eval_file(tmp_path, 8))).eval_set
    resumed = dataclasses.replace(job, metadata={**job.metadata, "eval_set": started.record})
    own = tmp_path / "ck" / "step-00002"
    again = job_evaluation(resumed, campaigns.get("ev"), own, 2, tmp_path / "ck")
    assert again.spec.name == first.sha256 and not again.spec.at_start
    none_then = dataclasses.replace(job, metadata={**job.metadata, "eval_set": None})
    assert job_evaluation(none_then, campaigns.get("ev"), own, 2, tmp_path / "ck").spec is None
    # A job continuing the campaign at the step the set changed at is its first: baseline; later ones are not.
    with campaigns.edit("ev") as c:
        c.eval_sets[-1]["from_step"] = 8
    assert job_evaluation(job, campaigns.get("ev"), tmp_path / "other" / "step-00008", 8, tmp_path / "ck").spec.at_start
    later = job_evaluation(job, campaigns.get("ev"), tmp_path / "other" / "step-00012", 12, tmp_path / "ck")
    assert later.spec.name == second.sha256 and not later.spec.at_start


def test_evaluations_reach_the_log_the_job_record_and_live_progress(settings, store, tmp_path):
    job = _enqueue(settings, store)
    set_eval_set(settings, store, "ev", None)  # history without a set first: the last change is what counts
    change = set_eval_set(settings, store, "ev", EvalSetRequest(_eval_file(tmp_path), num_probes=1))
    engine, emitted = EvalEngine(), []
    runner = JobRunner(settings, store, "gpu0@t", engine=engine, heartbeat_s=60, beat_s=60)
    outcome = runner.run(job.id, Publisher(), emit=lambda p: emitted.append(dict(p)))
    assert outcome.action is OutcomeKind.COMPLETED
    done = store.get(job.id)
    assert done.metadata["eval_set"] == change.eval_set.to_record()
    assert [p["step"] for p in done.metadata["eval_history"]] == [2, 4]
    assert "answers" not in done.metadata["eval_history"][0]  # answers live in the campaign's log, not in Redis
    assert (done.final_eval_loss, done.eval_s, done.train_s) == (2.0, 0.1, 0.5)
    directory = CampaignStore(settings.guild_home).directory("tiny-qwen3", "ev")
    logged = read_log(directory)
    assert [(e.job_id, e.point.step, e.point.answers[0].text) for e in logged] == [
        (job.id, 2, "answer at 2"), (job.id, 4, "answer at 4")]
    after = [p for p in emitted if p["step"] >= 2]
    assert after and all(p["eval_step"] in (2, 4) and p["sample"].startswith("answer at") for p in after)
    assert "eval_loss" not in emitted[0]  # step 1: nothing evaluated yet
    assert engine.specs[0].at_start  # the first job on the set


def test_the_reporter_never_raises(tmp_path):
    class Broken:
        def log(self, *a, **k):
            raise OSError("disk full")

    reporter = EvalReporter(tmp_path / "missing-dir", "job", None, Broken())
    reporter.on_eval(EvalPoint(1, 1.0, 1, 1, 0.0, "sha"))  # no directory, a broken tracker: logged, not raised
    assert reporter.latest == {}
    ok = EvalReporter(tmp_path, "job", None, Broken())
    ok.on_eval(EvalPoint(1, 1.0, 1, 1, 0.0, "sha"))
    assert json.loads((tmp_path / "evaluations.jsonl").read_text())["step"] == 1
