"""Reliability 6: concurrent submitters lose and duplicate nothing; the same content twice is refused.

Eight ``python -m enqueue`` processes start at once, each with 100 distinct files. The files of every process
have the same names (``d000.jsonl`` ... ``d099.jsonl``), so their job ids collide and ``JobStore.create`` must
find each a free id under contention.
"""

from __future__ import annotations

import json
import time

import pytest

from jobs import keys
from tests.reliability_helpers import queued_task_ids, record_figure, run_clis_at_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCESSES = 8
FILES_EACH = 100


def _write_batches(root) -> list[list[str]]:
    batches = []
    for p in range(PROCESSES):
        directory = root / f"p{p}"
        directory.mkdir()
        paths = []
        for i in range(FILES_EACH):
            path = directory / f"d{i:03d}.jsonl"
            path.write_text(json.dumps({"prompt": f"process {p}, file {i}: {p} * {i}?", "response": f"{p * i}"}) + "\n")
            paths.append(str(path))
        batches.append(paths)
    return batches


def _submit_at_once(guild_env, batches, campaign: str):
    started = time.monotonic()
    outs = run_clis_at_once(guild_env, [["enqueue", *paths, "--campaign", campaign, "--json"] for paths in batches],
                            timeout_s=240)
    return outs, time.monotonic() - started


def _check_nothing_lost_or_duplicated(store, client, batches, outs, campaign: str, guild_home) -> list[str]:
    reported = [j["id"] for out in outs for j in json.loads(out.stdout)]
    total = PROCESSES * FILES_EACH
    assert len(reported) == total and len(set(reported)) == total
    assert client.zcard(keys.JOBS_ALL) == total
    assert client.scard(keys.JOBS_BY_STATUS.format(status="queued")) == total
    assert client.zcard(keys.JOBS_QUEUED) == total and client.hlen(keys.JOBS_SUMMARY) == total
    assert client.zcard(keys.CAMPAIGN_PENDING.format(id=campaign)) == total
    messages = queued_task_ids(client)
    assert len(messages) == total and set(messages) == set(reported), "messages lost or duplicated"
    jobs = store.get_many(reported)
    assert len(jobs) == total and all(j.status.value == "queued" and j.attempts == 0 for j in jobs)
    # Every file's content is held by exactly its own job, and every job by its own content.
    owners = {}
    for job in jobs:
        sha = job.metadata["dataset_sha256"]
        owners.setdefault(sha, []).extend(i.decode() for i in client.smembers(keys.DATASET_OWNER.format(sha=sha)))
    assert len(owners) == total and all(len(set(o)) == 1 for o in owners.values())
    assert sorted(o[0] for o in owners.values()) == sorted(reported)
    sources = sorted(j.metadata["source_path"] for j in jobs)
    assert sources == sorted(p for paths in batches for p in paths)
    seqs = [j.metadata["seq"] for j in jobs]
    assert len(set(seqs)) == total, "two jobs share a queue position"
    campaign_record = json.loads(next((guild_home / "campaigns").glob(f"*/{campaign}/campaign.json")).read_text())
    assert sorted(campaign_record["job_ids"]) == sorted(reported), "the campaign record lost jobs"
    return reported


def test_eight_submitters_800_jobs_none_lost_or_duplicated(run_cli, guild_env, store, redis_client, guild_home,
                                                          tmp_path):
    batches = _write_batches(tmp_path)
    created = run_cli("campaigns", "create", "crowd", "--hero", "tiny-qwen3")
    assert created.returncode == 0, created.stderr
    outs, took_s = _submit_at_once(guild_env, batches, "crowd")
    assert [o.returncode for o in outs] == [0] * PROCESSES, [o.stderr[-500:] for o in outs if o.returncode]
    reported = _check_nothing_lost_or_duplicated(store, redis_client, batches, outs, "crowd", guild_home)
    collided = sum(1 for i in reported if i.rsplit("-", 1)[-1].isdigit() and i.rsplit("-", 1)[0] in reported)

    # ---- the same content again: refused as a duplicate (naming the job that holds it) unless --force ---------------
    again = run_cli("enqueue", batches[3][7], "--campaign", "crowd")
    assert again.returncode == 2 and "same content as job" in again.stderr and "--force" in again.stderr
    owner = next(j for j in store.get_many(reported) if j.metadata["source_path"] == batches[3][7])
    assert owner.id in again.stderr
    assert redis_client.zcard(keys.JOBS_ALL) == PROCESSES * FILES_EACH
    forced = run_cli("enqueue", batches[3][7], "--campaign", "crowd", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    [forced_id] = [j["id"] for j in json.loads(forced.stdout)]
    assert forced_id not in reported and redis_client.zcard(keys.JOBS_ALL) == PROCESSES * FILES_EACH + 1
    record_figure("concurrent-submitters", runs=1, passes=1, lost=0, duplicated=0, processes=PROCESSES,
                  jobs=len(reported), submit_s=round(took_s, 1), id_collisions_resolved=collided,
                  duplicate_refused=True, forced_accepted=True)


def test_concurrent_first_submissions_to_a_new_campaign_all_go_in(guild_env, store, guild_home, tmp_path):
    """Deterministic: two submissions both find the campaign missing, then both create it (one interleaving of
    two `python -m enqueue` processes started at once). All but the first used to fail with "campaign already
    exists" (RELIABILITY.md, finding 4)."""
    from campaigns.campaign import find_target, join_or_create
    from config.settings import get_settings

    settings = get_settings()
    first = find_target(settings.guild_home, None, "brand-new")
    second = find_target(settings.guild_home, None, "brand-new")
    assert first.campaign is None and second.campaign is None  # both see no campaign yet
    a = join_or_create(settings.guild_home, first)
    b = join_or_create(settings.guild_home, second)
    assert a.id == b.id == "brand-new"
