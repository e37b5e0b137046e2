"""The job lifecycle on a worker, with a stand-in engine: transient failures retry with backoff, data errors skip."""

import time

import pytest

from config.settings import get_settings
from jobs.job import JobStatus
from jobs.submit import SubmitRequest, submit
from tasks.lifecycle import JobRunner, is_transient
from tests.services import REPO


class _Engine:
    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    def run_job(self, *args, **kwargs):
        self.calls += 1
        raise self.exc


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which is what the GPU raises."""


@pytest.fixture
def one_job(store, guild_env):
    sent = []
    [job] = submit(get_settings(), store, SubmitRequest([str(REPO / "examples" / "text.jsonl")]),
                   lambda job_id, prio: sent.append(job_id))
    return job.id


def test_transient_failure_requeues_with_backoff_then_fails_past_max_attempts(store, one_job):
    runner = JobRunner(get_settings(), store, "gpu0@t", engine=_Engine(OutOfMemoryError("CUDA out of memory")))
    republished = []
    outcome = runner.run(one_job, lambda jid, prio, at_head=False: republished.append(jid))
    job = store.get(one_job)
    assert outcome.action == "requeued" and job.status is JobStatus.QUEUED and republished == [one_job]
    assert job.attempts == 1 and "CUDA out of memory" in job.last_error
    assert store.runtime(one_job)["retry_at"] > time.time()  # backoff: not before retry_at
    assert "retry in 5 s" in store.history(one_job)[-1]["reason"]
    deferred = runner.run(one_job, lambda *a, **k: None)
    assert deferred.action == "deferred" and runner.engine.calls == 1
    for expected_attempts in (2, 3):
        store.update(one_job, retry_at=0)
        runner.run(one_job, lambda *a, **k: None)
        assert store.get(one_job).attempts == expected_attempts
    final = store.get(one_job)
    assert final.status is JobStatus.FAILED and "CUDA out of memory" in final.last_error  # max_attempts = 3


def test_a_plain_crash_fails_with_traceback_and_no_retry(store, one_job):
    runner = JobRunner(get_settings(), store, "gpu0@t", engine=_Engine(ValueError("shape mismatch")))
    outcome = runner.run(one_job, lambda *a, **k: None)
    job = store.get(one_job)
    assert outcome.action == "failed" and job.status is JobStatus.FAILED and job.attempts == 1
    assert job.last_error == "ValueError: shape mismatch" and "Traceback" in job.metadata["traceback"]


def test_a_broken_chat_template_fails_the_job_instead_of_skipping_the_data(store, one_job):
    from engine.errors import ChatTemplateError

    broken = ChatTemplateError("the chat template in /m/chat_template.jinja is broken: it renders nothing")
    outcome = JobRunner(get_settings(), store, "gpu0@t", engine=_Engine(broken)).run(one_job, lambda *a, **k: None)
    job = store.get(one_job)
    assert outcome.action == "failed" and job.status is JobStatus.FAILED
    assert "chat_template.jinja is broken" in job.last_error


def test_is_transient():
    import redis

    assert is_transient(OutOfMemoryError("x")) and is_transient(redis.ConnectionError("blip"))
    assert not is_transient(ValueError("bad"))
