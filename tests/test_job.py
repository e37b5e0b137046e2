import pytest

from jobs.errors import IllegalTransition
from jobs.job import ALLOWED, Job, JobStatus, check_transition, make_job_id


def test_job_id_has_timestamp_and_safe_filename():
    from datetime import datetime

    job_id = make_job_id("my data (v2).jsonl", datetime(2026, 11, 28, 9, 5, 7))
    assert job_id == "20261128T090507_my_data_v2"  # no colon (scp, some file systems), no extension


@pytest.mark.parametrize("filename,name", [("数据.jsonl", "数据"), ("café crème.jsonl", "cafe_creme"),
                                           ("がぎ.jsonl", "がぎ"), ("Ｆｕｌｌ.jsonl", "Full"), ("a:b c.jsonl", "a_b_c"),
                                           ("..evil.jsonl", "evil"), (".jsonl", "jsonl"), ("_.jsonl", "dataset")])
def test_job_id_keeps_names_readable_in_any_script(filename, name):
    from datetime import datetime

    assert make_job_id(filename, datetime(2026, 1, 2, 3, 4, 5)) == f"20260102T030405_{name}"


def test_collision_suffix_goes_after_the_name():
    from jobs.job import id_variant

    assert [id_variant("20260102T030405_data", n) for n in (1, 2, 3)] == [
        "20260102T030405_data", "20260102T030405_data-2", "20260102T030405_data-3"]


@pytest.mark.parametrize("source,target", [("completed", "processing"), ("skipped", "queued"),
                                           ("queued", "completed"), ("failed", "completed")])
def test_illegal_transitions_raise(source, target):
    with pytest.raises(IllegalTransition, match=f"cannot go from {source} to {target}"):
        check_transition("j", JobStatus(source), JobStatus(target))


def test_every_status_has_rules_and_retry_edges_exist():
    assert set(ALLOWED) == set(JobStatus)
    check_transition("j", JobStatus.FAILED, JobStatus.QUEUED)
    check_transition("j", JobStatus.PROCESSING, JobStatus.QUEUED)


def test_round_trip_through_dict():
    job = Job(id="a", dataset_path="/d", hero_id="h", campaign_id="c", priority="low", metadata={"x": 1})
    again = Job.from_dict(job.to_dict())
    assert again == job and again.status is JobStatus.QUEUED
