"""Tests of engine.formats: every bad-input kind gives a clear Problem with file and line; good files parse."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import GuildError
from engine.formats import (
    DEFAULT_LIMITS,
    FORMATS,
    DatasetError,
    DatasetLimits,
    DatasetSummary,
    Example,
    Problem,
    estimate_tokens,
    parse_bytes,
    read_examples,
    validate_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SHOWN = "data/train.jsonl"  # the display path: problems must name the file as the user gave it

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
PAIR = {"prompt": "2+2?", "response": "4"}
TEXT = {"text": "Some text."}


def jsonl(*objects: object) -> bytes:
    """Return JSON Lines bytes, one compact JSON value per line, ending with a newline."""
    return "".join(json.dumps(obj) + "\n" for obj in objects).encode("utf-8")


def chat(*messages: object) -> bytes:
    """Return one messages-format line holding ``messages`` as given."""
    return jsonl({"messages": list(messages)})


def user(content: object = "Hi") -> dict:
    return {"role": "user", "content": content}


def assistant(content: object = "Hello.") -> dict:
    return {"role": "assistant", "content": content}


def first_problem(path: Path) -> Problem:
    """Read ``path`` expecting a DatasetError; return its first problem after checking the error's text."""
    with pytest.raises(DatasetError) as caught:
        read_examples(path, display_path=SHOWN)
    error = caught.value
    assert error.problems, "a DatasetError must carry at least one problem"
    assert str(error).splitlines()[0] == str(error.problems[0])
    return error.problems[0]


# (file bytes, expected line (None: whole-file problem), a phrase the message must hold)
BAD_CONTENT = [
    # --- not JSON ---
    pytest.param(b'{"text": "a" "b"}\n', 1, "invalid JSON: Expecting ',' delimiter at column 14", id="json-delimiter"),
    pytest.param(
        jsonl(TEXT, TEXT) + b'{"text": }\n', 3, "invalid JSON: Expecting value at column 10", id="json-line-3"
    ),
    pytest.param(jsonl(TEXT) + b'{"text": "abc', 2, "the last line looks truncated", id="truncated-last-line"),
    pytest.param(b"{'text': 'a'}\n", 1, "Expecting property name enclosed in double quotes", id="json-single-quotes"),
    pytest.param(b"[" * 100_000 + b"\n", 1, "nested too deeply", id="json-too-deep"),
    pytest.param(jsonl(TEXT).replace(b"\n", b"\r") * 2, 1, "CR only", id="cr-only-line-ends"),
    # --- not UTF-8 text ---
    pytest.param(
        jsonl(TEXT) + '{"text": "café"}\n'.encode("latin-1"), 2, "not UTF-8 (byte 0xE9 at column 14)", id="latin-1"
    ),
    pytest.param(
        '{"text": "a"}\n'.encode("utf-16"), None, "looks like UTF-16; save the file as UTF-8", id="utf-16-bom"
    ),
    pytest.param('{"text": "a"}\n'.encode("utf-16-be"), None, "looks like UTF-16", id="utf-16-be-no-bom"),
    pytest.param('{"text": "a"}\n'.encode("utf-16-le"), None, "looks like UTF-16", id="utf-16-le-no-bom"),
    pytest.param('{"text": "a"}\n'.encode("utf-32"), None, "looks like UTF-32", id="utf-32"),
    pytest.param(jsonl(TEXT, TEXT) + b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 5, "NUL byte", id="binary-nul"),
    pytest.param(b"\xff\xd8\xff\xe1 garbage \x80\x81\n", 1, "not UTF-8 (byte 0xFF at column 1)", id="binary-no-nul"),
    pytest.param(gzip.compress(jsonl(TEXT)), None, "gzip-compressed", id="gzip"),
    # --- not one object per line ---
    pytest.param(b"42\n", 1, "expected a JSON object", id="line-number"),
    pytest.param(b'"hello"\n', 1, "got a string", id="line-string"),
    pytest.param(b"null\n", 1, "got null", id="line-null"),
    pytest.param(jsonl(TEXT, [1, 2]), 2, "got a list; write one example per line", id="line-list"),
    pytest.param(b"\n" + jsonl([TEXT, TEXT]), None, "the file is one JSON array", id="json-array-one-line"),
    pytest.param(
        json.dumps([TEXT, TEXT], indent=2).encode(),
        None,
        "write one JSON object per line (JSON Lines)",
        id="json-array-pretty",
    ),
    pytest.param(
        b"\n" + json.dumps(TEXT, indent=2).encode() + b"\n",
        2,
        "a JSON object spans lines 2-4",
        id="pretty-printed-object",
    ),
    pytest.param(b"", None, "no examples; a dataset needs at least one line", id="empty-file"),
    pytest.param(b"\n  \r\n\t\n", None, "no examples", id="only-blank-lines"),
    pytest.param(b"\xef\xbb\xbf", None, "no examples", id="only-bom"),
    # --- keys of a line ---
    pytest.param(jsonl({"text": "a", "id": 7}), 1, "unknown key 'id'", id="extra-top-level-key"),
    pytest.param(jsonl({"txt": "a"}), 1, "unknown key 'txt' (did you mean 'text'?)", id="text-missing"),
    pytest.param(jsonl({"message": []}), 1, "did you mean 'messages'?", id="messages-missing"),
    pytest.param(jsonl({"conversations": []}), 1, "ShareGPT", id="sharegpt"),
    pytest.param(jsonl({}), 1, "empty object; a line holds exactly one of", id="empty-object"),
    pytest.param(jsonl({"text": "a", "prompt": "b", "response": "c"}), 1, "mixes formats", id="mixed-in-line"),
    pytest.param(
        jsonl(CHAT, CHAT, CHAT, CHAT, PAIR, TEXT),
        5,
        "line 5 is prompt/response format but the file started with messages format at line 1",
        id="mixed-formats",
    ),
    pytest.param(
        b"\n" + jsonl(TEXT, CHAT),
        3,
        "is messages format but the file started with text format at line 2",
        id="mixed-formats-text-first",
    ),
    # --- messages ---
    pytest.param(jsonl({"messages": "hi"}), 1, "'messages' must be a list", id="messages-not-list"),
    pytest.param(jsonl({"messages": {"role": "user"}}), 1, "got an object", id="messages-object"),
    pytest.param(jsonl({"messages": []}), 1, "'messages' is an empty list", id="messages-empty"),
    pytest.param(chat(user(), "Hello."), 1, "messages[1] must be an object", id="message-not-object"),
    pytest.param(chat({"content": "x"}, assistant()), 1, "messages[0] has no 'role'", id="role-missing"),
    pytest.param(
        chat({"role": 1, "content": "x"}, assistant()), 1, "messages[0].role must be a string", id="role-not-string"
    ),
    pytest.param(chat(user(), {"role": "bot", "content": "x"}), 1, "messages[1].role is 'bot'", id="role-unknown"),
    pytest.param(chat(user(), {"role": "Assistant", "content": "x"}), 1, "roles are lowercase", id="role-capitals"),
    pytest.param(chat(user(), {"role": "assistant"}), 1, "messages[1].content is missing", id="content-missing"),
    pytest.param(chat(user(None), assistant()), 1, "messages[0].content must be a string, got null", id="content-null"),
    pytest.param(
        chat(user([{"type": "text", "text": "Hi"}]), assistant()), 1, "must be a string, got a list", id="content-parts"
    ),
    pytest.param(
        chat(user(), {"role": "assistant", "content": "x", "name": "bob"}),
        1,
        "messages[1] has unknown key 'name'",
        id="message-extra-key",
    ),
    pytest.param(
        chat({"role": "system", "content": "Be brief."}, user()), 1, "no assistant message", id="no-assistant"
    ),
    pytest.param(
        chat(user(), assistant(" \n"), user(), assistant("")),
        1,
        "every assistant message is empty",
        id="assistant-empty",
    ),
    pytest.param(chat(user(), assistant("\ud83d")), 1, "unpaired surrogate", id="lone-surrogate"),
    # --- prompt / response ---
    pytest.param(jsonl({"response": "4"}), 1, "'prompt' is missing", id="prompt-missing"),
    pytest.param(
        jsonl({"prompt": 2, "response": "4"}), 1, "'prompt' must be a string, got a number", id="prompt-not-string"
    ),
    pytest.param(jsonl({"prompt": "  ", "response": "4"}), 1, "'prompt' is empty", id="prompt-empty"),
    pytest.param(jsonl({"prompt": "2+2?"}), 1, "'response' is missing", id="response-missing"),
    pytest.param(
        jsonl({"prompt": "2+2?", "response": True}),
        1,
        "'response' must be a string, got a boolean",
        id="response-not-string",
    ),
    pytest.param(jsonl({"prompt": "2+2?", "response": ""}), 1, "'response' is empty", id="response-empty"),
    pytest.param(
        jsonl({"completion": "4", "prompt": "2+2?"}), 1, "rename 'completion' to 'response'", id="completion-key"
    ),
    # --- text ---
    pytest.param(jsonl({"text": ["a"]}), 1, "'text' must be a string, got a list", id="text-not-string"),
    pytest.param(jsonl(TEXT, {"text": ""}), 2, "'text' is empty", id="text-empty"),
]


@pytest.mark.parametrize(("content", "line", "phrase"), BAD_CONTENT)
def test_bad_content_gives_a_clear_problem(tmp_path: Path, content: bytes, line: int | None, phrase: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    problem = first_problem(path)
    assert problem.path == SHOWN
    assert problem.line == line, str(problem)
    assert phrase in problem.message, str(problem)


def test_truncated_hint_only_on_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "abc\n' + jsonl(TEXT))
    problem = first_problem(path)
    assert problem.line == 1
    assert "truncated" not in problem.message
    assert "Unterminated string starting at column 10" in problem.message


def test_not_utf8_is_reported_once_with_a_count(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TEXT) + '{"text": "é"}\n'.encode("latin-1") * 3)
    with pytest.raises(DatasetError) as caught:
        read_examples(path, display_path=SHOWN)
    assert [problem.line for problem in caught.value.problems] == [2]
    assert "2 more lines hold non-UTF-8 bytes" in caught.value.problems[0].message


def test_every_pretty_printed_object_is_named_once(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(json.dumps(obj, indent=2).encode() + b"\n" for obj in (TEXT, TEXT)))
    with pytest.raises(DatasetError) as caught:
        read_examples(path, display_path=SHOWN)
    assert [problem.line for problem in caught.value.problems] == [1, 4]


def test_all_problems_are_collected_in_line_order(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(PAIR, {"prompt": "", "response": 3}, PAIR) + b"oops\n" + jsonl({"prompt": "x"}))
    with pytest.raises(DatasetError) as caught:
        read_examples(path, display_path=SHOWN)
    lines = [(problem.line, problem.message.split(" ")[0]) for problem in caught.value.problems]
    assert lines == [(2, "'prompt'"), (2, "'response'"), (4, "invalid"), (5, "'response'")]


def test_max_problems_lists_that_many_then_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(*([{"text": ""}] * 25)))
    with pytest.raises(DatasetError) as caught:
        read_examples(path, display_path=SHOWN, max_problems=20)
    error = caught.value
    assert len(error.problems) == 20
    assert error.omitted == 5
    lines = str(error).splitlines()
    assert lines[0] == f"{SHOWN}:1: 'text' is empty"
    assert lines[-1] == "and 5 more problems"
    assert len(lines) == 21


def test_max_problems_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_problems"):
        parse_bytes(jsonl(TEXT), SHOWN, max_problems=0)


# --- the file itself ---------------------------------------------------------------------------------------


def make_missing(tmp_path: Path) -> Path:
    return tmp_path / "absent.jsonl"


def make_directory(tmp_path: Path) -> Path:
    (tmp_path / "dir.jsonl").mkdir()
    return tmp_path / "dir.jsonl"


def make_symlink_loop(tmp_path: Path) -> Path:
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    return tmp_path / "a.jsonl"


def make_dangling_symlink(tmp_path: Path) -> Path:
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "gone.jsonl")
    return tmp_path / "link.jsonl"


def make_file_as_folder(tmp_path: Path) -> Path:
    (tmp_path / "file").write_bytes(jsonl(TEXT))
    return tmp_path / "file" / "train.jsonl"


def make_fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "pipe.jsonl")
    return tmp_path / "pipe.jsonl"


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        pytest.param(make_missing, "no such file", id="missing"),
        pytest.param(make_directory, "is a directory, not a .jsonl file", id="directory"),
        pytest.param(make_symlink_loop, "symlink loop", id="symlink-loop"),
        pytest.param(make_dangling_symlink, "symlink whose target does not exist", id="dangling-symlink"),
        pytest.param(make_file_as_folder, "is not a directory", id="file-as-folder"),
        pytest.param(make_fifo, "is not a regular file", id="fifo"),
    ],
)
def test_unreadable_paths_give_a_whole_file_problem(tmp_path: Path, make, phrase: str) -> None:
    problem = first_problem(make(tmp_path))
    assert problem.path == SHOWN
    assert problem.line is None
    assert phrase in problem.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TEXT))
    path.chmod(0)
    problem = first_problem(path)
    assert (problem.line, problem.path) == (None, SHOWN)
    assert "permission denied" in problem.message


def test_permission_denied_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Runs as root too: make open() fail the way it does for an unreadable file.
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TEXT))

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr("builtins.open", deny)
    problem = first_problem(path)
    assert problem.line is None
    assert "permission denied" in problem.message


def test_path_defaults_to_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DatasetError) as caught:
        validate_file(str(path))
    assert str(caught.value) == f"{path}: no such file"


# --- good files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "count"),
    [
        ("messages", "messages", 50),
        ("prompt_response", "prompt_response", 50),
        ("text", "text", 50),
        ("chat_small", "messages", 240),
    ],
)
def test_example_files_parse(name: str, fmt: str, count: int) -> None:
    path = EXAMPLES / f"{name}.jsonl"
    examples = read_examples(path)
    assert len(examples) == count
    assert {example.format for example in examples} == {fmt}
    assert [example.line for example in examples] == list(range(1, count + 1))
    summary = validate_file(path, display_path=f"examples/{name}.jsonl")
    assert summary == DatasetSummary(
        path=f"examples/{name}.jsonl",
        format=fmt,
        num_examples=count,
        estimated_tokens=estimate_tokens(examples),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    assert summary.estimated_tokens > 0


def test_messages_fields() -> None:
    line = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": ""},  # empty user turns are allowed
            {"role": "assistant", "content": "Hello."},
        ]
    }
    (example,) = parse_bytes(jsonl(line), SHOWN)
    assert example == Example(
        format="messages",
        line=1,
        messages=(("system", "Be brief."), ("user", ""), ("assistant", "Hello.")),
    )
    assert example.num_chars() == len("Be brief.") + len("Hello.")


def test_prompt_response_and_text_fields() -> None:
    (pair,) = parse_bytes(jsonl(PAIR), SHOWN)
    assert (pair.format, pair.prompt, pair.response, pair.num_chars()) == ("prompt_response", "2+2?", "4", 5)
    (text,) = parse_bytes(jsonl(TEXT), SHOWN)
    assert (text.format, text.text, text.num_chars()) == ("text", "Some text.", 10)


def test_crlf_blank_lines_bom_and_no_final_newline(tmp_path: Path) -> None:
    body = b"\r\n" + jsonl(CHAT).replace(b"\n", b"\r\n") + b"\r\n   \r\n" + json.dumps(CHAT).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body)
    examples = read_examples(path)
    assert [example.line for example in examples] == [2, 5]
    assert examples[0].messages == (("user", "Hi"), ("assistant", "Hello."))


def test_unicode_content_and_line_separators_in_strings() -> None:
    line = {"text": "naïve café — 東京 🚀 a\u2028b"}
    (example,) = parse_bytes(jsonl(line), SHOWN)
    assert example.text == line["text"]


def test_summary_fields_and_token_heuristic(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    data = jsonl({"prompt": "a" * 36, "response": "é" * 9}, {"prompt": "b", "response": "c"})
    path.write_bytes(data)
    summary = validate_file(path, display_path=SHOWN)
    assert (summary.path, summary.format, summary.num_examples) == (SHOWN, "prompt_response", 2)
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    # 36 + 18 + 1 + 1 = 56 bytes of content: ceil(56 / 3.6) = 16; 4 segments of 8 template tokens.
    assert summary.estimated_tokens == 16 + 4 * 8


def test_token_estimate_is_exact_on_a_multiple_of_3_6() -> None:
    example = Example(format="text", line=1, text="x" * 36)
    assert estimate_tokens([example]) == 10 + 8


def test_example_rejects_an_unknown_format() -> None:
    assert FORMATS == ("messages", "prompt_response", "text")
    with pytest.raises(ValueError, match="unknown example format"):
        Example(format="chat", line=1)


def test_problem_str() -> None:
    assert str(Problem("a.jsonl", 3, "bad")) == "a.jsonl:3: bad"
    assert str(Problem("a.jsonl", None, "bad")) == "a.jsonl: bad"


def test_dataset_error_is_a_guild_error_and_pickles() -> None:
    error = DatasetError([Problem("a.jsonl", 1, "bad"), Problem("a.jsonl", 2, "worse")], omitted=1)
    assert isinstance(error, GuildError)
    assert str(error) == "a.jsonl:1: bad\na.jsonl:2: worse\nand 1 more problem"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, copy.omitted, str(copy)) == (error.problems, 1, str(error))


def test_import_is_light() -> None:
    code = (
        "import engine.formats, sys; "
        "heavy = {'torch', 'transformers', 'numpy', 'celery', 'redis'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# --- streaming, limits and long error lists ----------------------------------------------------------------


def read_error(path: Path, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        validate_file(path, display_path=SHOWN, **kwargs)
    return caught.value


def test_a_csv_file_is_named_as_such_and_the_list_says_how_many_more(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("prompt,response\n" + "".join(f"what is {i}?,{i}\n" for i in range(40)))
    error = read_error(path)
    lines = str(error).splitlines()
    assert lines[0] == (f"{SHOWN}: this looks like CSV (comma-separated values), not JSON Lines; convert each row to "
                        'one JSON object per line, e.g. {"prompt": "...", "response": "..."}')
    assert [p.line for p in error.problems[1:]] == list(range(1, 20))
    assert (error.omitted, lines[-1]) == (22, "and 22 more problems")  # 41 lines + the whole-file problem, 20 listed


def test_a_tab_separated_file_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("prompt\tresponse\nhi\tthere\n")
    assert "this looks like TSV (tab-separated values)" in read_error(path).problems[0].message


def test_broken_json_is_not_taken_for_csv(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a", "x"\n{"text": "b",}\n')
    assert "CSV" not in str(read_error(path))


def test_every_line_of_another_format_is_still_checked(tmp_path: Path) -> None:
    """A mixed file: the first differing line is named, and a broken line of either format is reported."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(PAIR, {"messages": "x"}, PAIR, {"messages": "y"}, {"prompt": "p"}))
    error = read_error(path)
    assert [(p.line, p.message.split(";")[0]) for p in error.problems] == [
        (2, "line 2 is messages format but the file started with prompt/response format at line 1"),
        (2, "'messages' must be a list of {\"role\": ..., \"content\": ...} objects, got a string"),
        (4, "'messages' must be a list of {\"role\": ..., \"content\": ...} objects, got a string"),
        (5, "'response' is missing"),
    ]


def test_an_overlong_line_is_named_and_the_next_lines_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(TEXT) + jsonl({"text": "x" * 5000}) + jsonl({"text": ""}) + jsonl(TEXT))
    error = read_error(path, limits=DatasetLimits(max_line_bytes=1024))
    assert [p.line for p in error.problems] == [2, 3]
    assert error.problems[0].message.startswith("the line is longer than 1 KiB, the limit per line")
    assert "GUILD_MAX_LINE_BYTES" in error.problems[0].message
    # Exactly at the limit is fine, CRLF included.
    line = json.dumps({"text": "y" * 1000}).encode()
    path.write_bytes(line + b"\r\n")
    assert validate_file(path, limits=DatasetLimits(max_line_bytes=len(line))).num_examples == 1


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(*([TEXT] * 100)))
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("the file was opened"))
    error = read_error(path, limits=DatasetLimits(max_file_bytes=1024))
    assert [(p.line, p.message) for p in error.problems] == [
        (None, "is 2.2 KiB, over the limit of 1 KiB per dataset file; split it into several files (each becomes a job "
               "of the same campaign) or raise GUILD_MAX_DATASET_BYTES")]


def test_too_many_examples_stop_the_check(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(*([TEXT] * 30)) + b"\n\n")
    error = read_error(path, limits=DatasetLimits(max_examples=10))
    assert len(error.problems) == 1 and error.problems[0].line is None
    assert error.problems[0].message.startswith("holds more than 10 examples (checked up to line 10)")
    assert validate_file(path, limits=DatasetLimits(max_examples=30)).num_examples == 30


class _CountingReader:
    """A binary file that counts the bytes handed out (to prove a check stops reading early)."""

    def __init__(self, real):
        self.real, self.handed_out = real, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()

    def read(self, *args):
        data = self.real.read(*args)
        self.handed_out += len(data)
        return data

    def readline(self, *args):
        data = self.real.readline(*args)
        self.handed_out += len(data)
        return data


def test_a_binary_file_is_refused_at_its_first_line_without_reading_the_rest(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "zeros.jsonl"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20)  # a sparse file: 256 MiB of NUL bytes, no disk used
    real_open, readers = open, []

    def counting_open(*args, **kwargs):
        readers.append(_CountingReader(real_open(*args, **kwargs)))
        return readers[-1]

    monkeypatch.setattr("builtins.open", counting_open)
    error = read_error(path, limits=DEFAULT_LIMITS)
    assert [(p.line, p.message.split(";")[0]) for p in error.problems] == [
        (1, "holds a NUL byte (0x00 at byte 1 of the line)")]
    assert readers[0].handed_out <= 2 * DEFAULT_LIMITS.max_line_bytes  # of 256 MiB


def test_validation_hashes_what_it_streams(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    data = jsonl(*[{"text": f"line {i} " + "é" * (i % 7)} for i in range(3000)])
    path.write_bytes(data)
    summary = validate_file(path, limits=DatasetLimits(max_line_bytes=64))
    assert summary.sha256 == hashlib.sha256(data).hexdigest() and summary.num_examples == 3000
    assert summary.estimated_tokens == estimate_tokens(read_examples(path))


def test_limits_come_from_the_settings() -> None:
    from config.errors import SettingsError
    from config.settings import Settings

    env = {"GUILD_HOME": "/tmp/x", "GUILD_MAX_DATASET_BYTES": "4GiB", "GUILD_MAX_LINE_BYTES": "512KiB",
           "GUILD_MAX_EXAMPLES": "2_000_000"}
    assert Settings.from_env(env).dataset_limits == DatasetLimits(4 * 2**30, 512 * 2**10, 2_000_000)
    assert Settings.from_env({"GUILD_HOME": "/tmp/x"}).dataset_limits == DEFAULT_LIMITS
    for bad in ("lots", "0", "-5", "1.5GiB"):
        with pytest.raises(SettingsError, match="GUILD_MAX_EXAMPLES"):
            Settings.from_env({"GUILD_HOME": "/tmp/x", "GUILD_MAX_EXAMPLES": bad})
