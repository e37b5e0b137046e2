"""The job lifecycle on a worker, without Redis: the in-memory store and stand-in engines.

Transient failures retry with backoff, crashes fail with their traceback, a poisoned CUDA context fails the job and
replaces the process, a job taken over while its worker stalled keeps the new owner's results, a lost campaign
lock leaves the campaign alone, a store that stops answering mid-job costs nothing, and the worker trains the plan
frozen at enqueue.
"""

from __future__ import annotations

import json
import time

import pytest
import redis

from campaigns.campaign import CampaignStore
from config.settings import Settings
from jobs.cli_format import job_view
from jobs.job import JobStatus, StopReason
from jobs.memory_store import MemoryJobStore
from jobs.submit import SubmitRequest, submit
from tasks.engines import StandInEngine
from tasks.lifecycle import JobRunner, OutcomeKind
from tasks.sweeper import release_due, sweep_once
from tests.services import REPO

EXAMPLES = REPO / "examples"
A_SENTINEL_LOSS = 999.0


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


class Publisher:
    def __init__(self):
        self.sent: list[tuple[str, str, bool]] = []

    def __call__(self, job_id, priority, at_head=False):
        self.sent.append((job_id, priority, at_head))


class Engine(StandInEngine):
    """A stand-in engine with hooks: ``on_step(step)`` runs after each step; ``raises`` is raised at once."""

    def __init__(self, steps_s=0.001, raises=None, on_step=None):
        super().__init__(step_s=steps_s)
        self.raises, self.on_step = raises, on_step
        self.calls, self.configs = 0, []

    def run_job(self, dataset_path, config, on_progress, should_stop, **kw):
        self.calls += 1
        self.configs.append(config)
        if self.raises is not None:
            raise self.raises

        def progress(step, *args):
            on_progress(step, *args)
            if self.on_step is not None:
                self.on_step(step)

        return super().run_job(dataset_path, config, progress, should_stop, **kw)


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which is what the GPU raises."""


@pytest.fixture
def home(tmp_path):
    return tmp_path / "guild-home"


@pytest.fixture
def settings(home):
    return Settings(guild_home=home, redis_url="redis://127.0.0.1:1/0", heartbeat_stale_s=60.0)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(home, clock):
    return MemoryJobStore(home, clock=clock)


def _enqueue(settings, store, path=EXAMPLES / "text.jsonl", **request):
    [job] = submit(settings, store, SubmitRequest([str(path)], **request), Publisher())
    return job.id


def _runner(settings, store, engine, name="gpu0@t", beat_s=60.0):
    """A runner whose beat thread stays quiet unless the test asks for it (``beat_s``)."""
    return JobRunner(settings, store, name, engine=engine, heartbeat_s=beat_s, beat_s=beat_s)


# ------------------------------------------------------------------------------------------- retry and failure


def test_transient_failure_requeues_with_backoff_then_fails_past_max_attempts(settings, store):
    job_id = _enqueue(settings, store)
    runner = _runner(settings, store, Engine(raises=OutOfMemoryError("CUDA out of memory")))
    republished = Publisher()
    outcome = runner.run(job_id, republished)
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.REQUEUED and job.status is JobStatus.QUEUED
    assert republished.sent == [(job_id, "normal", False)]
    assert job.attempts == 1 and "CUDA out of memory" in job.last_error
    assert store.runtime(job_id).retry_at > time.time()  # backoff: not before retry_at
    assert "retry in 5 s" in store.history(job_id)[-1]["reason"]
    delivered = Publisher()
    waiting = runner.run(job_id, delivered)
    assert waiting.action is OutcomeKind.WAITING and runner.engine.calls == 1 and delivered.sent == []
    assert waiting.detail.startswith("waiting for its retry backoff until ")
    for expected_attempts in (2, 3):
        store.update(job_id, retry_at=0)
        runner.run(job_id, Publisher())
        assert store.get(job_id).attempts == expected_attempts
    final = store.get(job_id)
    assert final.status is JobStatus.FAILED and "CUDA out of memory" in final.last_error  # max_attempts = 3
    assert [h["reason"].split(" (")[0] for h in store.history(job_id) if h["to"] == "queued"][1:] == [
        "attempt 1 failed", "attempt 2 failed"]


def test_max_attempts_comes_from_the_plan(settings, store):
    job_id = _enqueue(settings, store, sets={"queue.max_attempts": "1"})
    runner = _runner(settings, store, Engine(raises=OutOfMemoryError("CUDA out of memory")))
    assert runner.run(job_id, Publisher()).action is OutcomeKind.FAILED
    job = store.get(job_id)
    assert job.attempts == 1 and "gave up after 1 attempts" in job.last_error


def test_a_plain_crash_fails_with_traceback_and_no_retry(settings, store):
    job_id = _enqueue(settings, store)
    runner = _runner(settings, store, Engine(raises=ValueError("shape mismatch")))
    outcome = runner.run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.FAILED and not outcome.replace_worker
    assert job.status is JobStatus.FAILED and job.attempts == 1
    assert job.last_error == "ValueError: shape mismatch" and "Traceback" in job.metadata["traceback"]


def test_a_device_side_assert_fails_the_job_and_replaces_the_worker_process(settings, store):
    job_id = _enqueue(settings, store)
    error = RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA")
    republished = Publisher()
    outcome = _runner(settings, store, Engine(raises=error)).run(job_id, republished)
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.FAILED and outcome.replace_worker
    assert job.status is JobStatus.FAILED and job.attempts == 1 and republished.sent == []
    assert "device-side assert" in job.last_error and "process is replaced" in job.last_error


def test_a_broken_chat_template_fails_the_job_instead_of_skipping_the_data(settings, store):
    from engine.errors import ChatTemplateError

    job_id = _enqueue(settings, store)
    broken = ChatTemplateError("the chat template in /m/chat_template.jinja is broken: it renders nothing")
    outcome = _runner(settings, store, Engine(raises=broken)).run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.FAILED and job.status is JobStatus.FAILED
    assert "chat_template.jinja is broken" in job.last_error


def test_a_failed_gang_is_retried_from_its_checkpoint_without_replacing_the_worker(settings, store):
    from engine.gang import GangFailed

    job_id = _enqueue(settings, store)
    failed = GangFailed(1, 2, "was killed by signal 9 (SIGKILL)")
    outcome = _runner(settings, store, Engine(raises=failed)).run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.REQUEUED and not outcome.replace_worker
    assert job.status is JobStatus.QUEUED and "rank 1 of 2 was killed by signal 9" in job.last_error


class _SmallGpu(Engine):
    def device_memory(self):
        return 2**30  # 1 GiB: the tiny hero's estimate is 1.7 GiB


def test_a_job_that_does_not_fit_the_workers_gpu_fails_before_anything_loads(settings, store):
    job_id = _enqueue(settings, store)
    engine = _SmallGpu()
    outcome = _runner(settings, store, engine).run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.FAILED and engine.calls == 0
    assert job.last_error.startswith("this job needs ~1.7 GiB (weights 0.0, gradients 0.0, optimizer 0.0")
    assert "more than the 1.0 GiB of this worker's GPU; no single change fits" in job.last_error


class _TwoRanks(Engine):
    def live_ranks(self):
        return 2


def test_a_multi_rank_workers_progress_says_its_ranks(settings, store):
    import dataclasses

    job_id = _enqueue(settings, store, sets={"max_steps": "2"})
    shown = []
    runner = _runner(dataclasses.replace(settings, ranks=2), store, _TwoRanks())
    assert runner.run(job_id, Publisher(), emit=shown.append).action is OutcomeKind.COMPLETED
    assert [(p["step"], p["ranks"], p["ranks_expected"]) for p in shown] == [(1, 2, 2), (2, 2, 2)]
    one = _enqueue(settings, store, sets={"max_steps": "1"}, campaign="other", force=True)
    shown.clear()
    _runner(settings, store, Engine()).run(one, Publisher(), emit=shown.append)
    assert shown and "ranks" not in shown[0]  # a one-process worker says nothing of ranks


# ------------------------------------------------------------------------------------------- waiting (parked)


def test_a_job_behind_another_of_its_campaign_waits_without_a_message_and_starts_when_it_ends(settings, store):
    """The job ahead runs on worker A; B's delivery on worker B parks (no republish, no loop); A's end wakes it."""
    first = _enqueue(settings, store, sets={"max_steps": "3"}, campaign="shared")
    second = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl", sets={"max_steps": "2"}, campaign="shared")
    other_worker, parked = _runner(settings, store, Engine(), name="gpu1@t"), []

    def deliver_second(step):
        if step == 1:
            sent = Publisher()
            parked.append((other_worker.run(second, sent), sent.sent, store.runtime(second).waiting))

    woke = Publisher()
    assert _runner(settings, store, Engine(on_step=deliver_second)).run(first, woke).action is OutcomeKind.COMPLETED
    [(outcome, sent, wait)] = parked
    assert outcome.action is OutcomeKind.WAITING and outcome.detail == f"after job {first} of campaign shared"
    assert sent == [] and wait.after == first and wait.kind.value == "campaign"
    assert woke.sent == [(second, "normal", True)]  # the end of the first woke it, at the head of its queue
    assert store.runtime(second).waiting is None and store.waiting() == {} and store.unpublished(0) == []
    assert other_worker.run(second, Publisher()).action is OutcomeKind.COMPLETED
    assert store.get(second).start_step == 3


def test_a_job_behind_a_queued_one_waits_for_it_and_the_sweep_wakes_it_when_that_one_is_cancelled(
        settings, store):
    first = _enqueue(settings, store, campaign="c")
    second = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl", campaign="c")
    store.mark_published([first, second])
    outcome = _runner(settings, store, Engine()).run(second, Publisher())
    assert outcome.action is OutcomeKind.WAITING and outcome.wait.after == first
    from jobs.control import cancel_job

    cancel_job(store, first)  # its message is in a queue somewhere; nobody may ever deliver it
    sent = []
    sweep_once(store, 60, lambda job_id, priority, at_head=False: sent.append((job_id, at_head)))
    assert sent == [(second, True)] and store.waiting() == {}
    assert _runner(settings, store, Engine()).run(second, Publisher()).action is OutcomeKind.COMPLETED


def test_a_backoff_wait_is_released_by_the_sweep_when_it_is_over(settings, store, clock):
    job_id = _enqueue(settings, store, sets={"max_steps": "2"})
    store.mark_published([job_id])
    runner = _runner(settings, store, Engine(raises=OutOfMemoryError("CUDA out of memory")))
    runner.run(job_id, Publisher())
    waiting = runner.run(job_id, Publisher())
    assert waiting.action is OutcomeKind.WAITING and waiting.wait.until == store.runtime(job_id).retry_at
    sent = []
    assert release_due(store, lambda *a, **k: sent.append(a)) == [] and sent == []
    clock.now = store.runtime(job_id).retry_at + 0.5
    assert release_due(store, lambda job_id, priority, at_head=False: sent.append((job_id, at_head))) == [job_id]
    assert sent == [(job_id, True)] and store.waiting() == {} and store.unpublished(0) == []


def test_a_second_copy_of_a_running_jobs_message_is_dropped_not_parked(settings, store):
    job_id = _enqueue(settings, store, sets={"max_steps": "3"})
    copies = []

    def deliver_again(step):
        if step == 1:
            copies.append(_runner(settings, store, Engine(), name="gpu1@t").run(job_id, Publisher()))

    assert _runner(settings, store, Engine(on_step=deliver_again)).run(job_id, Publisher()).action is \
        OutcomeKind.COMPLETED
    assert copies[0].action is OutcomeKind.DROPPED and store.waiting() == {}


# ------------------------------------------------------------------------------------------- the happy path


def test_a_job_completes_and_advances_its_campaign(settings, store, home):
    job_id = _enqueue(settings, store, sets={"max_steps": "4", "save_steps": "2"})
    outcome = _runner(settings, store, Engine()).run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.COMPLETED, outcome
    assert job.status is JobStatus.COMPLETED and job.attempts == 1 and (job.start_step, job.final_step) == (0, 4)
    assert job.final_loss == pytest.approx(2.0 / 1.4)
    campaign = CampaignStore(home).get(job.campaign_id)
    assert campaign.current_step == 4 and campaign.latest_checkpoint == job.metadata["checkpoint"]
    assert campaign.latest_checkpoint.endswith("step-00004") and campaign.job_ids == [job_id]
    assert [h["to"] for h in store.history(job_id)] == ["queued", "processing", "completed"]
    assert store.unpublished(0) == []  # nothing for the sweep to send


class ReportingEngine(Engine):
    """Returns what the torch engine reports beside the figures: the attention path, loss kernel, warnings."""

    def run_job(self, *args, **kw):
        result = super().run_job(*args, **kw)
        result.attention, result.loss_kernel = "per_document", "chunked"
        result.warnings = ["warmup_steps=0 with decay_steps=0: the LR is 0 from the first step"]
        return result


def test_what_the_engine_ran_and_its_warnings_reach_the_record_and_jobs_show(settings, store):
    job_id = _enqueue(settings, store, sets={"max_steps": "2"})
    assert _runner(settings, store, ReportingEngine()).run(job_id, Publisher()).action is OutcomeKind.COMPLETED
    job = store.get(job_id)
    assert (job.metadata["attention"], job.metadata["loss_kernel"]) == ("per_document", "chunked")
    assert job.metadata["engine_warnings"] == ["warmup_steps=0 with decay_steps=0: the LR is 0 from the first step"]
    shown = job_view(job).splitlines()
    assert "attention:         per_document" in shown and "loss_kernel:       chunked" in shown
    [workload] = [line for line in shown if line.startswith("workload:")]  # one readable line, not a dict
    assert " tokens over " in workload and "{" not in workload
    assert "warning:           warmup_steps=0 with decay_steps=0: the LR is 0 from the first step" in shown


def test_the_worker_trains_the_plan_frozen_at_enqueue(settings, store, home):
    """A hero file or config.json changed after enqueue changes new jobs only."""
    heroes = home / "heroes"
    heroes.mkdir(parents=True)
    profile = (REPO / "heroes" / "tiny-qwen3.yaml").read_text().replace("id: tiny-qwen3", "id: myhero")
    (heroes / "myhero.yaml").write_text(profile)
    (home / "config.json").write_text(json.dumps({"hyperparams": {"learning_rate": 0.5}}))
    first = _enqueue(settings, store, hero_id="myhero", sets={"max_steps": "2"})

    (heroes / "myhero.yaml").write_text(profile.replace("warmup_steps: 5", "warmup_steps: 7"))
    (home / "config.json").write_text(json.dumps({"hyperparams": {"learning_rate": 0.25}}))
    second = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl", hero_id="myhero", sets={"max_steps": "2"})

    engine = Engine()
    runner = _runner(settings, store, engine)
    assert runner.run(first, Publisher()).action is OutcomeKind.COMPLETED
    assert runner.run(second, Publisher()).action is OutcomeKind.COMPLETED
    trained = [(c.hyperparams.learning_rate, c.hyperparams.warmup_steps) for c in engine.configs]
    assert trained == [(0.5, 5), (0.25, 7)]
    a, b = store.get(first), store.get(second)
    assert a.plan.sources["hyperparams.learning_rate"] == "project" and a.plan.sources["hyperparams.warmup_steps"] \
        == "hero"
    assert a.config_hash == a.plan.config_hash != b.config_hash and a.plan.hero.training_defaults["hyperparams"][
        "warmup_steps"] == 5

    # An architecture change is refused at enqueue (the campaign's locked block), naming the field.
    (heroes / "myhero.yaml").write_text(profile.replace("vocab_size: 4096", "vocab_size: 8192"))
    from jobs.errors import PlanMismatch

    with pytest.raises(PlanMismatch, match="vocab_size: campaign has 4096, job resolves 8192"):
        _enqueue(settings, store, path=EXAMPLES / "prompt_response.jsonl", hero_id="myhero")


def test_queue_settings_do_not_change_the_config_hash(settings, store):
    plain = store.get(_enqueue(settings, store))
    more = store.get(_enqueue(settings, store, path=EXAMPLES / "messages.jsonl", sets={"queue.max_attempts": "5"}))
    assert plain.config_hash == more.config_hash and more.plan.queue.max_attempts == 5
    assert more.plan.sources["queue.max_attempts"] == "cli" and plain.plan.queue.max_attempts == 3


# ----------------------------------------------------------------------------------------- the risky branches


def test_a_job_taken_over_while_stalled_keeps_the_new_owners_results(settings, store, clock, home):
    """Worker A stalls past the stale window (its lease lapses too); B takes the job over and completes it; then A
    comes back and finishes: nothing A writes may land, neither in the job nor in the campaign."""
    job_id = _enqueue(settings, store, sets={"max_steps": "6", "save_steps": "3"})
    runner_b = _runner(settings, store, Engine(), name="gpu1@b")
    outcomes = {}

    def stall_then_b_takes_over(step):
        if step == 2 and "b" not in outcomes:
            clock.now += 120  # A was frozen for two minutes
            outcomes["b"] = runner_b.run(job_id, Publisher())

    class StalledA(Engine):
        def run_job(self, *args, **kw):
            result = super().run_job(*args, **kw)
            result.final_loss, result.checkpoint_path = A_SENTINEL_LOSS, "/written/by/A"
            return result

    outcome_a = _runner(settings, store, StalledA(on_step=stall_then_b_takes_over)).run(job_id, Publisher())
    assert outcomes["b"].action is OutcomeKind.COMPLETED
    assert outcome_a.action is OutcomeKind.DROPPED and outcome_a.detail == "taken over while stalled"
    job = store.get(job_id)
    assert job.status is JobStatus.COMPLETED and store.runtime(job_id).worker == "gpu1@b" and job.attempts == 2
    assert job.final_loss != A_SENTINEL_LOSS and job.metadata["checkpoint"] != "/written/by/A"
    campaign = CampaignStore(home).get(job.campaign_id)
    assert campaign.latest_checkpoint == job.metadata["checkpoint"] and campaign.current_step == 6
    assert [h["to"] for h in store.history(job_id)] == ["queued", "processing", "queued", "processing", "completed"]


def test_a_run_that_learns_it_was_taken_over_stops_at_once(settings, store, clock):
    job_id = _enqueue(settings, store, sets={"max_steps": "500"})
    token_holder = {}

    def taken(step):
        if step == 3:
            clock.now += 120
            store.take_over_stale(job_id, 60)
            store.claim(job_id, "gpu1@b", token="b-token")
            token_holder["b"] = True
        time.sleep(0.01)

    engine = Engine(on_step=taken)
    outcome = _runner(settings, store, engine, beat_s=0.02).run(job_id, Publisher())
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.DROPPED
    assert job.status is JobStatus.PROCESSING and store.runtime(job_id).claim == "b-token"
    assert job.progress is None or job.progress["step"] <= 3  # A's later progress never landed
    assert len(job.metadata.get("loss_history", [])) == 0


def test_a_lost_campaign_lock_stops_the_job_and_leaves_the_campaign_alone(settings, store, clock, home):
    job_id = _enqueue(settings, store, sets={"max_steps": "500", "save_steps": "2"})
    campaign_id = store.get(job_id).campaign_id

    def lease_lapses_and_someone_takes_it(step):
        if step == 3:
            clock.now += 120
            assert store.acquire_campaign_lock(campaign_id, "intruder|x", 600)
        time.sleep(0.01)

    republished = Publisher()
    outcome = _runner(settings, store, Engine(on_step=lease_lapses_and_someone_takes_it), beat_s=0.02).run(
        job_id, republished)
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.REQUEUED and "campaign lock lost" in outcome.detail
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and 3 <= job.final_step < 500
    assert republished.sent == [(job_id, "normal", True)]  # back at the head of its queue
    assert CampaignStore(home).get(campaign_id).current_step == 0
    assert store.campaign_lock_holder(campaign_id) == "intruder|x"


def test_a_lock_lost_just_before_the_commit_leaves_the_campaign_alone(settings, store, clock, home):
    job_id = _enqueue(settings, store, sets={"max_steps": "4"})
    campaign_id = store.get(job_id).campaign_id

    def on_last_step(step):
        if step == 4:
            clock.now += 120
            store.acquire_campaign_lock(campaign_id, "intruder|y", 600)
            clock.now -= 119  # the job's own heartbeat is not stale: only the lease is gone

    republished = Publisher()
    outcome = _runner(settings, store, Engine(on_step=on_last_step)).run(job_id, republished)
    job = store.get(job_id)
    assert outcome.action is OutcomeKind.REQUEUED and "campaign lock lost before the campaign" in outcome.detail
    assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.final_step == 4
    assert CampaignStore(home).get(campaign_id).current_step == 0
    assert republished.sent == [(job_id, "normal", True)]


class FlakyStore:
    """The memory store, whose beats fail like a Redis that stopped answering, for ``outage_beats`` beats."""

    def __init__(self, inner, outage_beats):
        self.inner, self.outage_beats, self.failed = inner, outage_beats, 0

    def beat(self, *args, **kwargs):
        if self.failed < self.outage_beats:
            self.failed += 1
            raise redis.TimeoutError("Timeout reading from socket")
        return self.inner.beat(*args, **kwargs)

    def renew_campaign_lock(self, *args):
        if self.failed < self.outage_beats:
            raise redis.ConnectionError("Connection reset by peer")
        return self.inner.renew_campaign_lock(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_store_outage_mid_job_costs_nothing(settings, store):
    """Every beat fails for a while (and monitoring raises too): the job trains on, completes in one attempt, and
    the first beat after the outage writes its progress."""
    job_id = _enqueue(settings, store, sets={"max_steps": "150"})
    flaky = FlakyStore(store, outage_beats=10)
    engine = Engine(steps_s=0.01)

    def broken_monitor(progress):
        raise ConnectionError("Flower's broker is down too")

    outcome = JobRunner(settings, flaky, "gpu0@t", engine=engine, heartbeat_s=0.02, beat_s=0.02).run(
        job_id, Publisher(), emit=broken_monitor)
    job = store.get(job_id)
    assert flaky.failed == 10, "the outage did not happen while the job ran"
    assert outcome.action is OutcomeKind.COMPLETED and job.attempts == 1 and job.final_step == 150
    assert [h["to"] for h in store.history(job_id)] == ["queued", "processing", "completed"]


class BrokerDown(Publisher):
    def __call__(self, job_id, priority, at_head=False):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_step_aside_whose_message_cannot_be_sent_is_sent_by_the_sweep(settings, store, clock):
    """The delivery being handled is acked even when the task fails: a step aside whose new message cannot go out
    (Redis killed meanwhile) must not leave the job queued with no message, forever. The fleet benchmark lost 11 jobs
    (4 of them their campaign's next, so 4 campaigns stalled) to a Redis kill -9 this way."""
    job_id = _enqueue(settings, store, sets={"max_steps": "200"})
    engine = Engine(steps_s=0.005, on_step=lambda step: store.request_stop(job_id, StopReason.PAUSE))
    runner = _runner(settings, store, engine, beat_s=0.01)
    runner.run(job_id, BrokerDown())  # the crash handler finds the job already back in the queue
    assert store.get(job_id).status is JobStatus.QUEUED
    assert store.unpublished(0) == [job_id]
    resent = Publisher()
    assert sweep_once(store, settings.heartbeat_stale_s, resent) == [] and resent.sent == []  # not stale yet
    clock.now += settings.heartbeat_stale_s
    sweep_once(store, settings.heartbeat_stale_s, resent)
    assert resent.sent == [(job_id, "normal", False)] and store.unpublished(0) == []


class ClaimDown:
    """The memory store, whose claim fails like a Redis killed between a worker taking a message and claiming."""

    def __init__(self, inner):
        self.inner = inner

    def claim(self, *args, **kwargs):
        raise redis.ConnectionError("Connection closed by server.")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_delivery_that_dies_before_its_claim_leaves_the_job_to_the_sweep(settings, store, clock):
    job_id = _enqueue(settings, store)
    with pytest.raises(redis.ConnectionError):
        _runner(settings, ClaimDown(store), Engine()).run(job_id, Publisher())
    assert store.get(job_id).status is JobStatus.QUEUED and store.unpublished(0) == [job_id]
    clock.now += settings.heartbeat_stale_s
    resent = Publisher()
    sweep_once(store, settings.heartbeat_stale_s, resent)
    assert resent.sent == [(job_id, "normal", False)]
    assert _runner(settings, store, Engine()).run(job_id, Publisher()).action is OutcomeKind.COMPLETED
    assert store.unpublished(0) == []


def test_a_parked_delivery_leaves_nothing_to_resend(settings, store):
    """Every delivery of a queued job marks it unpublished until it is claimed or parked: parking clears the mark
    with the wait (the job gets its next message when woken), so the sweep sends nothing."""
    _enqueue(settings, store)
    second = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl")
    sent = Publisher()
    assert _runner(settings, store, Engine()).run(second, sent).action is OutcomeKind.WAITING
    assert sent.sent == [] and store.unpublished(0) == [] and list(store.waiting()) == [second]


def test_a_lost_workers_campaign_stays_locked_until_the_sweep_takes_its_job_over(settings, store, clock, home):
    """A worker dies mid-job (its job stays processing until a sweep sees its stale heartbeat). The campaign's next
    job must not start in between: both would train from the same campaign step, and the lost job, resumed later,
    would overwrite the next one's progress (the fleet benchmark found 3 campaigns 10 steps short this way)."""
    from campaigns.lock import CampaignLock

    first = _enqueue(settings, store, sets={"max_steps": "4"})
    second = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl", sets={"max_steps": "4"})
    runner = _runner(settings, store, Engine())
    campaign = store.get(first).campaign_id
    # what a worker that took the first job and was then killed leaves behind: the claim and the campaign lock
    dead = CampaignLock(store, campaign, holder=f"gpu9@t:{first}", lease_s=runner_lease(settings))
    assert dead.acquire() and store.claim(first, "gpu9@t", lock_token=dead.token) is not None
    clock.now += settings.heartbeat_stale_s + 1  # its heartbeat is stale: no sweep has run yet
    waiting = runner.run(second, Publisher())  # the campaign is still held
    assert waiting.action is OutcomeKind.WAITING and waiting.wait.after == first
    swept = Publisher()
    assert sweep_once(store, settings.heartbeat_stale_s, swept) == [first]  # taken over, its lock released
    assert store.campaign_lock_holder(campaign) is None
    assert swept.sent == [(first, "normal", False)]  # the lost job goes first: the parked one stays parked
    assert list(store.waiting()) == [second]
    woken = Publisher()
    assert runner.run(first, woken).action is OutcomeKind.COMPLETED
    assert woken.sent == [(second, "normal", True)]  # the end of the run wakes the campaign's next job
    assert runner.run(second, Publisher()).action is OutcomeKind.COMPLETED
    assert CampaignStore(home).get(campaign).current_step == 8
    assert (store.get(first).start_step, store.get(second).start_step) == (0, 4)


def runner_lease(settings) -> float:
    return settings.heartbeat_stale_s + max(settings.heartbeat_stale_s, settings.sweep_interval_s)


def test_a_job_that_stepped_aside_resumes_before_a_higher_job_of_its_campaign(settings, store, home):
    """A low job is paused at step 4 while a high job of its campaign arrives. The low job must finish first: it
    resumes from its own checkpoint, and had the high job trained in between, that checkpoint would be a fork of
    the campaign and the high job's training lost from it (campaign step 10 instead of 20)."""
    low = _enqueue(settings, store, priority="low", sets={"max_steps": "10", "save_steps": "2"})
    high = {}

    def arrive_and_pause(step):
        if step == 4 and not high:
            high["id"] = _enqueue(settings, store, path=EXAMPLES / "messages.jsonl", priority="high",
                                  sets={"max_steps": "10"})
            store.request_stop(low, StopReason.PAUSE)

    runner = _runner(settings, store, Engine(steps_s=0.02, on_step=arrive_and_pause), beat_s=0.01)
    assert runner.run(low, Publisher()).action is OutcomeKind.REQUEUED
    store.clear_stop(low)
    campaign = store.get(low).campaign_id
    assert store.campaign_head(campaign) == low  # not the high job
    assert runner.run(high["id"], Publisher()).wait.after == low  # parked behind the low job
    assert runner.run(low, Publisher()).action is OutcomeKind.COMPLETED
    assert runner.run(high["id"], Publisher()).action is OutcomeKind.COMPLETED
    assert (store.get(low).final_step, store.get(high["id"]).start_step) == (10, 10)
    assert CampaignStore(home).get(campaign).current_step == 20
