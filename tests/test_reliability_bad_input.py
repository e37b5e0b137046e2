"""Reliability 5: broken datasets through ``python -m enqueue``, and a dataset corrupted in the store after enqueue.

tests/test_formats.py covers the parser in-process; here every kind of broken file goes through the CLI a user
runs. One call submits a good file and every bad one together: it must exit 2 without a traceback, name every bad
file (with the line where there is one), and enqueue nothing of the batch. A few single-bad-file calls check the
same alone.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import redis

from jobs import keys
from jobs.queues import PRIORITIES, celery_key
from tests.reliability_helpers import (
    enqueue_ids,
    no_traceback,
    record_figure,
    run_clis_at_once,
    wait_final,
    write_dataset,
)
from tests.services import REPO


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


GOOD_TEXT = _line({"text": "A good line."})
USER, ASSISTANT = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}


@dataclass(frozen=True)
class Case:
    name: str
    content: bytes | str | None  # bytes: the file; "dir", "missing", "loop", "dangling", "fifo": that kind of path
    line: int | None  # where the problem is reported; None for a whole-file problem
    says: str  # a fragment of the message (case-insensitive)


CASES = [
    Case("invalid-json-at-line-3", GOOD_TEXT * 2 + b'{"text": "x",}\n', 3, "invalid JSON"),
    Case("truncated-last-line", GOOD_TEXT + b'{"text": "cut he', 2, "truncated"),
    Case("latin-1", GOOD_TEXT + '{"text": "café"}\n'.encode("latin-1"), 2, "not UTF-8"),
    Case("utf-16-with-bom", '{"text": "hi"}\n'.encode("utf-16"), None, "UTF-16"),
    Case("utf-16-without-bom", '{"text": "hello there"}\n'.encode("utf-16-le"), None, "UTF-16"),
    Case("utf-32", '{"text": "hi"}\n'.encode("utf-32"), None, "UTF-32"),
    Case("binary-garbage", bytes(range(256)) * 4, 1, "binary"),
    Case("gzip", gzip.compress(GOOD_TEXT * 3), None, "gzip"),
    Case("zip", b"PK\x03\x04" + b"\x00" * 40, None, "zip"),
    Case("messages-not-a-list", _line({"messages": "Hi?"}), 1, "'messages' must be a list"),
    Case("messages-empty", _line({"messages": []}), 1, "empty list"),
    Case("message-not-an-object", _line({"messages": ["Hi?", ASSISTANT]}), 1, "must be an object"),
    Case("message-without-role", _line({"messages": [{"content": "Hi?"}, ASSISTANT]}), 1, "no 'role'"),
    Case("message-role-not-a-string", _line({"messages": [{"role": 1, "content": "Hi?"}, ASSISTANT]}), 1,
         "role must be a string"),
    Case("message-role-unknown", _line({"messages": [{"role": "human", "content": "Hi?"}, ASSISTANT]}), 1,
         "'user'"),
    Case("message-without-content", _line({"messages": [USER, {"role": "assistant"}]}), 1, "content is missing"),
    Case("message-content-not-a-string", _line({"messages": [USER, {"role": "assistant", "content": 4}]}), 1,
         "content must be a string"),
    Case("messages-without-assistant", _line({"messages": [USER]}), 1, "no assistant message"),
    Case("prompt-missing", _line({"response": "Paris."}), 1, "'prompt' is missing"),
    Case("response-missing", _line({"prompt": "Capital of France?"}), 1, "'response' is missing"),
    Case("prompt-not-a-string", _line({"prompt": 42, "response": "Paris."}), 1, "'prompt' must be a string"),
    Case("response-not-a-string", _line({"prompt": "Capital?", "response": None}), 1, "'response' must be a string"),
    Case("text-not-a-string", _line({"text": ["a", "b"]}), 1, "'text' must be a string"),
    Case("text-blank", _line({"text": "   "}), 1, "'text' is empty"),
    Case("text-nan", b'{"text": NaN}\n', 1, "'text' must be a string"),
    Case("empty-object", GOOD_TEXT + b"{}\n", 2, "empty object"),
    Case("unknown-key", _line({"text": "x", "id": 7}), 1, "unknown key"),
    Case("formats-mixed-in-file", GOOD_TEXT + _line({"prompt": "p", "response": "r"}), 2, "one format per file"),
    Case("formats-mixed-in-line", _line({"text": "a", "prompt": "b", "response": "c"}), 1, "mixes formats"),
    Case("json-array-instead-of-lines", json.dumps([{"text": "a"}, {"text": "b"}]).encode(), None, "JSON array"),
    Case("line-not-an-object", GOOD_TEXT + b'"just a string"\n', 2, "expected a JSON object"),
    Case("pretty-printed-object", json.dumps({"text": "a"}, indent=2).encode() + b"\n", 1, "spans lines"),
    Case("lone-surrogate", b'{"text": "\\ud800 alone"}\n', 1, "surrogate"),
    Case("cr-only-line-ends", b'{"text": "a"}\r{"text": "b"}\r', 1, "CR only"),
    Case("nested-too-deeply", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 1, "nested too deeply"),
    Case("empty-file", b"", None, "no examples"),
    Case("blank-lines-only", b"\n  \n\r\n", None, "no examples"),
    Case("a-directory", "dir", None, "directory"),
    Case("missing-path", "missing", None, "no such file"),
    Case("symlink-loop", "loop", None, "symlink loop"),
    Case("dangling-symlink", "dangling", None, "symlink whose target does not exist"),
    Case("fifo", "fifo", None, "not a regular file"),
    Case("csv-renamed-jsonl", b"prompt,response\n" + b"".join(b"what is %d?,%d\n" % (i, i) for i in range(30)), None,
         "this looks like CSV"),
    Case("broken-line-of-the-other-format", _line({"prompt": "p", "response": "r"}) * 2 + _line({"messages": "x"}) * 2,
         4, "'messages' must be a list"),
    Case("line-over-1-MiB", _line({"text": "x" * 2**20}), 1, "longer than 1 MiB, the limit per line"),
]
ALONE = ["missing-path", "a-directory", "symlink-loop", "json-array-instead-of-lines"]


def _make(directory, case: Case) -> str:
    path = directory / f"{case.name}.jsonl"
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif case.content == "dir":
        path.mkdir()
    elif case.content == "loop":
        os.symlink(directory / f"{case.name}-other.jsonl", path)
        os.symlink(path, directory / f"{case.name}-other.jsonl")
    elif case.content == "dangling":
        os.symlink(directory / "nowhere.jsonl", path)
    elif case.content == "fifo":
        os.mkfifo(path)
    return str(path)


def _enqueued_anything(client, home) -> list[str]:
    found = [k.decode() for k in client.scan_iter(match=keys.PREFIX + "*")]
    found += [f"queue {q}" for q in PRIORITIES if client.llen(celery_key(q))]
    datasets = home / "datasets"
    found += [str(p) for p in datasets.rglob("*") if p.is_file()] if datasets.exists() else []
    found += [str(p) for p in (home / "campaigns").glob("*/*")] if (home / "campaigns").exists() else []
    return found


@pytest.fixture(scope="module")
def bad_batch(redis_server, tiny_hero_dir, tmp_path_factory):
    """One ``python -m enqueue GOOD BAD...`` call over every case, run once for the module."""
    root = tmp_path_factory.mktemp("bad-input")
    home = root / "guild-home"
    (home / "heroes").mkdir(parents=True)
    os.symlink(tiny_hero_dir, home / "heroes" / "tiny-qwen3")
    files = root / "files"
    files.mkdir()
    good = str(write_dataset(files / "good.jsonl", "good"))
    paths = {case.name: _make(files, case) for case in CASES}
    client = redis.Redis.from_url(redis_server.admin_url)
    client.flushall()
    env = {**os.environ, "REDIS_URL": redis_server.url, "GUILD_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    batch = subprocess.run([sys.executable, "-m", "enqueue", good, *paths.values(), "--campaign", "bad-batch"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    batch_s = time.monotonic() - started
    left_by_batch = _enqueued_anything(client, home)
    alone = run_clis_at_once(env, [["enqueue", good, paths[name], "--campaign", "bad-alone"] for name in ALONE])
    left_by_alone = _enqueued_anything(client, home)
    yield SimpleNamespace(batch=batch, batch_s=batch_s, paths=paths, left_by_batch=left_by_batch,
                          alone=dict(zip(ALONE, alone)), left_by_alone=left_by_alone)
    client.flushall()


def test_the_batch_is_refused_whole(bad_batch):
    out = bad_batch.batch
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert no_traceback(out.stderr) and out.stdout == ""
    assert bad_batch.left_by_batch == [], "the refused batch left something behind"
    unnamed = [name for name, path in bad_batch.paths.items() if f"{path}:" not in out.stderr]
    assert unnamed == []
    record_figure("bad-input", runs=len(CASES), passes=len(CASES), lost=0, kinds=len(CASES),
                  batch_files=len(CASES) + 1, batch_exit=out.returncode, batch_s=round(bad_batch.batch_s, 2),
                  single_file_calls=len(ALONE), enqueued_from_bad_batches=0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_file_is_named_with_its_line(bad_batch, case):
    path = bad_batch.paths[case.name]
    lines = [line for line in bad_batch.batch.stderr.splitlines() if line.startswith(f"{path}:")]
    where = f"{path}:{case.line}: " if case.line else f"{path}: "
    assert any(line.startswith(where) and case.says.lower() in line.lower() for line in lines), lines


def test_a_long_problem_list_says_how_many_more(bad_batch):
    """The CSV file has 31 bad lines and a whole-file problem; 20 are listed, then the count of the rest."""
    path = bad_batch.paths["csv-renamed-jsonl"]
    lines = [line for line in bad_batch.batch.stderr.splitlines() if line.startswith(f"{path}:")]
    assert len(lines) == 21 and lines[-1] == f"{path}: and 12 more problems", lines[-3:]


def test_non_finite_and_zero_numbers_are_refused_at_enqueue(guild_env, redis_client, tmp_path):
    """``--set learning_rate=nan`` used to train a NaN checkpoint that became the campaign's latest."""
    good = str(write_dataset(tmp_path / "good.jsonl", "numbers"))
    calls = [["learning_rate=nan", "epochs=0", "max_grad_norm=-inf", "eps=1e999"],
             ["learning_rate=inf", "epochs=inf"]]
    outs = run_clis_at_once(guild_env, [["enqueue", good, *[a for s in c for a in ("--set", s)]] for c in calls])
    for sets, out in zip(calls, outs):
        assert out.returncode == 2 and no_traceback(out.stderr) and out.stdout == "", out.stderr
        lines = out.stderr.splitlines()
        for setting in sets:
            key = setting.split("=")[0]
            says = "must be positive, got 0.0 (0 epochs train nothing" if setting == "epochs=0" else \
                "expected a finite number"
            assert any(f"key '{key}': {says}" in line for line in lines), (setting, out.stderr)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("name", ALONE)
def test_a_bad_file_alone_is_refused(bad_batch, name):
    out = bad_batch.alone[name]
    assert out.returncode == 2 and no_traceback(out.stderr) and out.stdout == ""
    assert f"{bad_batch.paths[name]}: " in out.stderr
    assert bad_batch.left_by_alone == []


@pytest.mark.integration
@pytest.mark.slow
def test_dataset_corrupted_in_the_store_skips_its_job_and_the_next_runs(run_cli, start_worker, store, tmp_path):
    tiny = ["--set", "max_steps=2", "--set", "max_length=64", "--set", "eval_fraction=0", "--campaign", "corrupt"]
    [broken_id] = enqueue_ids(run_cli, str(write_dataset(tmp_path / "a.jsonl", "a")), *tiny)
    [next_id] = enqueue_ids(run_cli, str(write_dataset(tmp_path / "b.jsonl", "b")), *tiny)
    stored = store.get(broken_id).dataset_path
    with open(stored, "r+b") as f:  # garbage over the stored copy, after enqueue validated it
        f.write(b'{"text": "ok"}\n\xff\xfe\x00garbage')
    start_worker()
    broken, following = wait_final(store, [broken_id, next_id], timeout_s=90)
    assert broken.status.value == "skipped", (broken.status, broken.last_error)
    assert stored in broken.last_error and "binary" in broken.last_error
    assert broken.finished_at and broken.final_step is None
    assert following.status.value == "completed", following.last_error
    assert [h["to"] for h in store.history(broken_id)] == ["queued", "processing", "skipped"]
    record_figure("corrupted-in-store", runs=1, passes=1, lost=0, skipped_reason=broken.last_error.splitlines()[0],
                  next_job=following.status.value)
