"""jobs.retention: what a campaign keeps on disk, prune by hand, the disk figures of its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from campaigns.campaign import Campaign, CampaignStore
from campaigns.disk import format_bytes
from campaigns.errors import RetentionPolicyError
from engine import checkpoint_layout as layout
from jobs import retention
from jobs.job import Job, JobStatus
from tests.test_engine_checkpoint_layout import FILES, fake_checkpoint

FULL = sum(FILES.values()) + 2  # bytes of one fake checkpoint (+ its COMPLETE marker)
STATE = 2000 + 30 + 40 + 50  # of which optimizer and RNG state


class Lookup:
    """Job records by id, as JobStore.get_many gives them."""

    def __init__(self, jobs):
        self.jobs = {j.id: j for j in jobs}

    def get_many(self, ids):
        return [self.jobs[i] for i in ids if i in self.jobs]


def _job(job_id, status, final_step=None, checkpoint=None):
    return Job(id=job_id, dataset_path="/d", hero_id="tiny-qwen3", campaign_id="ret", priority="normal",
               status=status, final_step=final_step, metadata={"checkpoint": str(checkpoint) if checkpoint else None})


def _stage(home: Path):
    """Six completed jobs (two checkpoints each), and one job in every other state.

    c1..c6 completed at steps 10..60 (each saved step N-5 and N); f failed and x cancelled (two checkpoints
    each); q queued after a pause (one); r running (one complete, one being written); s skipped (one);
    orphan: a directory no job record names.
    """
    store = CampaignStore(home)
    campaign = store.create(Campaign(id="ret", hero_id="tiny-qwen3"))
    root = store.checkpoint_root(campaign)
    jobs = []
    for n in range(1, 7):
        fake_checkpoint(root / f"c{n}", 10 * n - 5)
        final = fake_checkpoint(root / f"c{n}", 10 * n)
        jobs.append(_job(f"c{n}", JobStatus.COMPLETED, 10 * n, final))
    for name, status in (("f", JobStatus.FAILED), ("x", JobStatus.CANCELLED)):
        fake_checkpoint(root / name, 61)
        fake_checkpoint(root / name, 62)
        jobs.append(_job(name, status))
    fake_checkpoint(root / "q", 63)
    jobs.append(_job("q", JobStatus.QUEUED))
    fake_checkpoint(root / "r", 64)
    (root / "r" / ".tmp-step-00065").mkdir()
    (root / "r" / ".tmp-step-00065" / "model.safetensors").write_bytes(b"\0" * 500)
    jobs.append(_job("r", JobStatus.PROCESSING))
    fake_checkpoint(root / "s", 3)
    jobs.append(_job("s", JobStatus.SKIPPED))
    fake_checkpoint(root / "orphan", 1)
    with store.edit("ret") as c:
        c.latest_checkpoint = str(root / "c6" / "step-00060")
        c.current_step = 60
        c.job_ids = [j.id for j in jobs]
    return store, root, Lookup(jobs)


@pytest.fixture
def campaign_with_history(tmp_path):
    return _stage(tmp_path / "home")


def _tree(root: Path) -> dict[str, list[str]]:
    return {str(p.relative_to(root)): sorted(f.name for f in p.iterdir())
            for p in sorted(root.glob("*/*")) if p.is_dir()}


def test_default_policy_keeps_exactly_the_latest_full_and_recent_weights(campaign_with_history):
    store, root, jobs = campaign_with_history
    report = retention.apply_retention(store, "ret", jobs)
    assert report.errors == []
    tree = _tree(root)
    assert sorted(tree) == ["c4/step-00040", "c5/step-00050", "c6/step-00060", "f/step-00062", "orphan/step-00001",
                            "q/step-00063", "r/.tmp-step-00065", "r/step-00064", "x/step-00062"]
    full = sorted([*FILES, "COMPLETE"])
    weights = sorted({*FILES} - set(layout.TRAINING_STATE_FILES) | {"COMPLETE", "WEIGHTS_ONLY"})
    assert tree["c6/step-00060"] == full  # the latest: what the next job resumes from
    assert tree["c5/step-00050"] == tree["c4/step-00040"] == weights
    assert tree["f/step-00062"] == tree["x/step-00062"] == tree["q/step-00063"] == full  # for retry / resume
    assert tree["r/step-00064"] == full and tree["orphan/step-00001"] == full
    assert sorted(p.name for p in root.iterdir()) == ["c4", "c5", "c6", "f", "orphan", "q", "r", "x"]
    # c1..c3 (2 each), c4..c6 older steps (1 each), f and x older steps, s: 12 removed; c4, c5 stripped
    assert report.freed_bytes == 12 * FULL + 2 * STATE
    assert not list(root.rglob(".trash-*"))
    again = retention.apply_retention(store, "ret", jobs)
    assert again.freed_bytes == 0 and again.acted_on() == []


def test_dry_run_deletes_nothing_and_says_what_it_would_free(campaign_with_history):
    store, root, jobs = campaign_with_history
    before = _tree(root)
    dry = retention.apply_retention(store, "ret", jobs, dry_run=True)
    assert _tree(root) == before
    assert dry.freed_bytes == 12 * FULL + 2 * STATE
    verdicts = {str(d.path.relative_to(root)): d.verdict.value for d in dry.decisions}
    assert verdicts["c6/step-00060"] == "keep" and verdicts["c5/step-00050"] == "strip"
    assert verdicts["c3/step-00030"] == "remove" and verdicts["f/step-00061"] == "remove"
    assert retention.apply_retention(store, "ret", jobs).freed_bytes == dry.freed_bytes


def test_a_custom_policy_is_read_from_the_campaign(campaign_with_history):
    store, root, jobs = campaign_with_history
    policy = retention.set_policy(store, "ret", keep_full=2, keep_weights=2)
    assert policy == retention.RetentionPolicy(2, 2)
    assert json.loads((root.parent / "campaign.json").read_text())["retention"] == {"keep_full": 2,
                                                                                    "keep_weights": 2}
    retention.apply_retention(store, "ret", jobs)
    assert sorted(p for p in _tree(root) if p.startswith("c")) == ["c5/step-00050", "c6/step-00060"]
    assert not layout.is_weights_only(root / "c5" / "step-00050")  # kept whole (keep_full=2)
    retention.set_policy(store, "ret", keep_weights="all")
    assert retention.policy_of(store.get("ret")) == retention.RetentionPolicy(2, None)


def test_the_latest_checkpoint_is_kept_even_when_the_policy_would_drop_it(campaign_with_history):
    store, root, jobs = campaign_with_history
    with store.edit("ret") as c:  # a campaign whose newest job completed without a step: latest is c2's
        c.latest_checkpoint = str(root / "c2" / "step-00020")
    retention.apply_retention(store, "ret", jobs)
    assert layout.is_complete(root / "c2" / "step-00020")
    assert not layout.is_weights_only(root / "c2" / "step-00020")


def test_leftover_trash_of_a_crashed_prune_is_cleared(campaign_with_history):
    store, root, jobs = campaign_with_history
    (root / "c1" / "step-00010").rename(root / "c1" / ".trash-step-00010-dead")
    (root / ".trash-old").write_bytes(b"\0" * 7)
    report = retention.apply_retention(store, "ret", jobs)
    assert report.trash_bytes == FULL + 7
    assert not list(root.rglob(".trash-*"))


@pytest.mark.parametrize("record, message", [
    ({"keep_full": 0}, "keep_full=0"),
    ({"keep_weights": -1}, "keep_weights=-1"),
    ({"keep_weights": "some"}, "keep_weights='some'"),
    ({"keep_al": 1}, "unknown retention key(s) keep_al"),
])
def test_bad_policies_are_refused_naming_the_key(record, message):
    with pytest.raises(RetentionPolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        retention.RetentionPolicy.from_record(record, "campaign x")


def test_disk_usage_by_kind(campaign_with_history):
    store, root, jobs = campaign_with_history
    usage = retention.disk_usage(store, store.get("ret"), jobs)
    assert usage.retry_bytes == 3 * FULL  # f, x and q's newest
    assert usage.running_bytes == FULL + 500
    assert usage.weights_only_bytes == 0 and usage.other_bytes == 0
    assert usage.full_bytes == usage.total_bytes - 4 * FULL - 500
    assert usage.reclaimable_bytes == 12 * FULL + 2 * STATE and usage.free_bytes > 0
    retention.apply_retention(store, "ret", jobs)
    after = retention.disk_usage(store, store.get("ret"), jobs)
    stripped = [root / "c4" / "step-00040", root / "c5" / "step-00050"]
    assert after.weights_only_bytes == sum(layout.path_bytes(p) for p in stripped)
    assert 2 * (FULL - STATE) < after.weights_only_bytes < 2 * (FULL - STATE) + 400  # + the WEIGHTS_ONLY markers
    assert after.full_bytes == 2 * FULL  # c6 and the orphan
    assert after.reclaimable_bytes == 0
    offline = retention.disk_usage(store, store.get("ret"))  # Redis unreachable: by content only
    assert offline.total_bytes == after.total_bytes and offline.retry_bytes == 0





# ------------------------------------------------------------------------------------- with the real engine


@pytest.mark.slow
def test_completed_jobs_prune_automatically_and_the_next_job_resumes(store, guild_env, guild_home, tmp_path):
    """Four real jobs of one campaign on a JobRunner: after each, the policy holds; a fifth resumes from the
    latest checkpoint. With the code before retention, every job kept two full checkpoints."""
    from config.settings import get_settings
    from jobs.submit import SubmitRequest, submit
    from tasks.lifecycle import JobRunner
    from tests.services import REPO

    sets = {"max_steps": "2", "save_steps": "1", "save_total_limit": "2", "eval_fraction": "0", "max_length": "64"}
    runner = JobRunner(get_settings(), store, "gpu0@t")
    campaigns = CampaignStore(guild_home)
    done = []
    for _ in range(5):
        [job] = submit(get_settings(), store, SubmitRequest([str(REPO / "examples" / "text.jsonl")], campaign="auto",
                                                             sets=sets, force=True), lambda *a: None)
        outcome = runner.run(job.id, lambda *a, **k: None)
        finished = store.get(job.id)
        assert outcome.action == "completed", (finished.last_error, outcome)
        done.append(finished)
        root = campaigns.checkpoint_root(campaigns.get("auto"))
        kept = sorted(str(p.relative_to(root)) for p in root.glob("*/step-*"))
        expected = [f"{j.id}/step-{j.final_step:05d}" for j in done[-3:]]
        assert kept == sorted(expected)
        assert sorted(p.name for p in root.iterdir()) == sorted(j.id for j in done[-3:])
        latest = campaigns.get("auto").latest_checkpoint
        assert latest == str(root / expected[-1]) and not layout.is_weights_only(Path(latest))
        assert {layout.OPTIMIZER_TENSORS, layout.RNG_TENSORS} <= {p.name for p in Path(latest).iterdir()}
        for older in expected[:-1]:
            assert layout.is_weights_only(root / older)
            assert not (root / older / layout.OPTIMIZER_TENSORS).exists()
            assert (root / older / "model.safetensors").exists()
    assert [(j.start_step, j.final_step) for j in done] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert done[-1].metadata["resume_from"] == str(root / f"{done[-2].id}/step-00008")


def stage_in_redis(store, guild_home: Path) -> Path:
    """The staged campaign under ``guild_home`` with its job records in Redis, each brought to its state the legal
    way; returns the checkpoint root."""
    _, root, jobs = _stage(guild_home)
    for job in jobs.jobs.values():
        store.create(job.__class__(**{**job.__dict__, "status": JobStatus.QUEUED}), f"sha-{job.id}")
        if job.status is not JobStatus.QUEUED:
            store.transition(job.id, JobStatus.PROCESSING, reason="test")
            if job.status is not JobStatus.PROCESSING:
                store.transition(job.id, job.status, reason="test", fields={"final_step": job.final_step})
    return root


def test_prune_cli_dry_run_then_prune(run_cli, store, guild_home):
    root = stage_in_redis(store, guild_home)
    before = _tree(root)
    dry = run_cli("campaigns", "prune", "ret", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert _tree(root) == before
    assert f"would free {format_bytes(12 * FULL + 2 * STATE)}" in dry.stdout
    assert "remove  c1/step-00005" in dry.stdout and "strip   c5/step-00050" in dry.stdout
    shown = run_cli("campaigns", "show", "ret")
    assert shown.returncode == 0, shown.stderr
    assert "kept-for-retry" in shown.stdout and "free" in shown.stdout
    done = run_cli("campaigns", "prune", "ret", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["freed_bytes"] == 12 * FULL + 2 * STATE
    assert len(_tree(root)) == 9


def test_policy_through_create_and_retention_commands(run_cli, guild_home):
    out = run_cli("campaigns", "create", "kept", "--hero", "tiny-qwen3", "--keep-full", "2", "--keep-weights", "all")
    assert out.returncode == 0, out.stderr
    assert json.loads(run_cli("campaigns", "show", "kept", "--json").stdout)["retention"] == {
        "keep_full": 2, "keep_weights": "all"}
    changed = run_cli("campaigns", "retention", "kept", "--keep-weights", "4")
    assert changed.returncode == 0 and "keep_full=2 keep_weights=4" in changed.stdout
    bad = run_cli("campaigns", "create", "nope", "--hero", "tiny-qwen3", "--keep-full", "0")
    assert bad.returncode == 2 and "keep_full=0: use a whole number >= 1" in bad.stderr
    assert not (guild_home / "campaigns" / "tiny-qwen3" / "nope").exists()  # refused before anything was created
