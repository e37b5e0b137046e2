"""Dataset line formats: read a chat ``.jsonl`` file, validate every line, report each problem as file:line.

A dataset is a UTF-8 JSON Lines file (blank lines, CRLF line ends and a leading UTF-8 BOM are fine) whose
every line holds one example in one of three formats, the same format on every line:

* ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` with at
  least one assistant message whose content is not blank;
* ``prompt_response``: ``{"prompt": str, "response": str}``, both not blank;
* ``text``: ``{"text": str}``, not blank.

Nothing else is accepted, not even an extra ``id`` key: every problem is reported with the file, the line
and how to fix it, all problems of a file together. This module uses only the standard library: the CLI
imports it, and must start fast, so torch, transformers and numpy stay out of it.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from config.errors import GuildError
from engine.example_checks import FORMAT_NAMES as _FORMAT_NAMES
from engine.example_checks import FORMATS, ROLES, example_fields, kind, line_format

__all__ = ["FORMATS", "ROLES"]  # re-exported: the formats and roles are part of this module's interface
from engine.jsonl_reader import UTF8_BOM as _UTF8_BOM
from engine.jsonl_reader import Line, LineSource

logger = logging.getLogger(__name__)


DEFAULT_MAX_PROBLEMS = 20

# Limits python -m enqueue applies (settings: GUILD_MAX_DATASET_BYTES, GUILD_MAX_LINE_BYTES, GUILD_MAX_EXAMPLES).
# A line needs no more than a few hundred KiB even at a 32k-token max_length (JSON escapes included); a file is
# one job, and a campaign takes any number of them.
from config.dataset_limits import (  # noqa: E402,F401 - defined below the engine; re-exported
    DEFAULT_LIMITS,
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_LINE_BYTES,
    DatasetLimits,
)

# The token estimate: English-like text runs at about 3.6 UTF-8 bytes per token with common BPE vocabularies,
# and a chat template adds a few tokens (role markers, separators) around each message or segment.
BYTES_PER_TOKEN = 3.6
TEMPLATE_TOKENS_PER_SEGMENT = 8

# Leading bytes of files people hand over by mistake: (magic, what it is, how to fix it).
_MAGIC = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive", "extract the .jsonl file from it"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first (unzstd)"),
    (b"PAR1", "a Parquet file", "export it to JSON Lines, one JSON object per line"),
)

# With errors="surrogateescape" every byte that is not valid UTF-8 decodes to one of these characters.
_ESCAPED_BYTE = re.compile("[\\udc80-\\udcff]")

_DECODER = json.JSONDecoder()
_PRETTY_WINDOW_CHARS = 2048  # first guess at the size of a pretty-printed object; doubled as needed
_PRETTY_MAX_BYTES = 16 * 2**20  # how far to look ahead for the end of a pretty-printed object
_HEAD_BYTES = 4096  # the first bytes, for the whole-file checks (compressed, UTF-16/32)
_JSON_ARRAY_PROBE_BYTES = 8 * 2**20  # a file starting with "[" up to this size is parsed whole to name it an array
_CSV_SNIFF_CHARS = 4096  # how much of a line is kept to tell CSV from broken JSON




@dataclass(frozen=True)
class Example:
    """One validated example: a line of a dataset file.

    Only the fields of its format are set: ``messages`` for "messages", ``prompt`` and ``response`` for
    "prompt_response", ``text`` for "text".
    """

    format: str  # one of FORMATS
    line: int  # 1-based line number in the file
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs, for "messages"
    prompt: str = ""
    response: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown example format {self.format!r}; expected one of {', '.join(FORMATS)}")

    def num_chars(self) -> int:
        """Return the total number of characters of content (message contents, prompt + response, or text)."""
        return sum(len(segment) for segment in _segments(self))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset file, where it is and how to fix it."""

    path: str  # the path as the user gave it
    line: int | None  # 1-based; None for whole-file problems (missing, a directory, empty...)
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class DatasetError(GuildError):
    """Raised when a dataset file has one or more problems.

    Attributes:
        problems: the problems found, in file order (whole-file problems first), at most ``max_problems``.
        omitted: how many more problems were found and not listed.

    ``str()`` gives one problem per line, then ``and N more problems`` when some were left out.
    """

    def __init__(self, problems: Iterable[Problem], omitted: int = 0):
        self.problems = list(problems)
        self.omitted = omitted
        # Both go to Exception.args so that the error survives pickling (a Celery result backend does that).
        super().__init__(self.problems, omitted)

    def __str__(self) -> str:
        lines = [str(problem) for problem in self.problems]
        if self.omitted:
            lines.append(self._more())
        return "\n".join(lines)

    def report_lines(self) -> list[str]:
        """One line per problem, then ``FILE: and N more problems`` when some were left out (for a list that
        mixes several files' problems)."""
        lines = [str(problem) for problem in self.problems]
        if self.omitted:
            lines.append(f"{self.problems[0].path}: {self._more()}" if self.problems else self._more())
        return lines

    def _more(self) -> str:
        return f"and {self.omitted} more problem{'' if self.omitted == 1 else 's'}"


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`validate_file` learned about a valid dataset file."""

    path: str  # the path as the user gave it
    format: str  # one of FORMATS
    num_examples: int
    estimated_tokens: int  # see estimate_tokens(): a cheap estimate, no tokenizer involved
    sha256: str  # hex sha256 of the raw file bytes


def read_examples(
    path: str | os.PathLike,
    display_path: str | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    limits: DatasetLimits | None = None,
) -> list[Example]:
    """Read, parse and validate a whole dataset file, one line at a time.

    Args:
        path: the file to read.
        display_path: how to name the file in problems; defaults to ``path`` as given.
        max_problems: list at most this many problems; the error then says how many more there are.
        limits: size limits to enforce (None: no limits, e.g. for a copy already checked at enqueue).

    Returns:
        The examples, in file order (at least one).

    Raises:
        DatasetError: the file cannot be read or has any problem (every line is checked).
    """
    shown = display_path if display_path is not None else os.fspath(path)
    scan = _scan_file(path, shown, max_problems, limits, keep_examples=True)
    return scan.examples


def validate_file(
    path: str | os.PathLike,
    display_path: str | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    limits: DatasetLimits | None = None,
) -> DatasetSummary:
    """Validate every line of a dataset file in one streaming pass and summarise it.

    Memory stays constant whatever the file's size: lines are checked as they are read and only counted.

    Args:
        path: the file to read.
        display_path: how to name the file in problems and in the summary; defaults to ``path`` as given.
        max_problems: list at most this many problems; the error then says how many more there are.
        limits: size limits to enforce (:data:`DEFAULT_LIMITS` is what ``python -m enqueue`` uses).

    Returns:
        The summary: format, number of examples, estimated tokens and the sha256 of the file's bytes.

    Raises:
        DatasetError: the file cannot be read, is over a limit or has any problem.
    """
    shown = display_path if display_path is not None else os.fspath(path)
    scan = _scan_file(path, shown, max_problems, limits, keep_examples=False)
    summary = DatasetSummary(
        path=shown,
        format=scan.file_format,
        num_examples=scan.num_examples,
        estimated_tokens=_token_estimate(scan.content_bytes, scan.num_segments),
        sha256=scan.sha256,
    )
    logger.debug(
        "validated %s: %d %s examples, about %d tokens",
        shown,
        summary.num_examples,
        summary.format,
        summary.estimated_tokens,
    )
    return summary


def parse_bytes(
    data: bytes, display_path: str, max_problems: int = DEFAULT_MAX_PROBLEMS, limits: DatasetLimits | None = None
) -> list[Example]:
    """Parse and validate the bytes of a dataset file (the same checks as :func:`read_examples`).

    Args:
        data: the raw bytes of the file.
        display_path: how to name the file in problems.
        max_problems: list at most this many problems; the error then says how many more there are.
        limits: size limits to enforce (None: none).

    Returns:
        The examples, in file order (at least one).

    Raises:
        DatasetError: anything is wrong: encoding, JSON, a field, formats mixed, a limit, or no example at all.
        ValueError: ``max_problems`` is below 1.
    """
    scan = _Scanner(display_path, max_problems, limits, keep_examples=True)
    if limits is not None and limits.max_file_bytes is not None and len(data) > limits.max_file_bytes:
        scan.add_file_problem(_file_too_big(len(data), limits.max_file_bytes))
        raise scan.fail()
    scan.run(io.BytesIO(data), len(data))
    return scan.examples


def estimate_tokens(examples: Iterable[Example]) -> int:
    """Estimate how many tokens the examples make, without a tokenizer.

    The heuristic: ``ceil(total UTF-8 bytes of content / 3.6)`` plus 8 tokens of template overhead per
    message (messages format) or per segment (prompt and response are two segments, text is one). It is
    meant for sizing and cost guesses, within a few tens of percent for English; code, other scripts and
    emoji tokenize differently.

    Args:
        examples: validated examples.

    Returns:
        The estimated number of tokens.
    """
    total_bytes = 0
    num_segments = 0
    for example in examples:
        for segment in _segments(example):
            total_bytes += len(segment.encode("utf-8"))
            num_segments += 1
    return _token_estimate(total_bytes, num_segments)


def _token_estimate(total_bytes: int, num_segments: int) -> int:
    # ceil(total_bytes / BYTES_PER_TOKEN) in integers (tenths of a byte): 3.6 is not exact in binary floating point.
    return -(-total_bytes * 10 // round(BYTES_PER_TOKEN * 10)) + TEMPLATE_TOKENS_PER_SEGMENT * num_segments


# ---------------------------------------------------------------------------------------------------------
# Reading the file


def read_bytes(path: str | os.PathLike, shown: str) -> bytes:
    """Return the whole file's bytes, or raise DatasetError with a whole-file problem saying why they cannot be read.

    Kept for callers that want the bytes; Guild itself streams (:func:`validate_file`, :func:`read_examples`).
    """
    with _open_dataset(path, shown) as handle:
        return handle.read()


def _open_dataset(path: str | os.PathLike, shown: str, limits: DatasetLimits | None = None) -> BinaryIO:
    """Open a dataset file for reading, or raise DatasetError with a whole-file problem saying why not."""
    try:
        # stat() first: open() on a FIFO would block until someone writes to it.
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            message = "is a directory, not a .jsonl file"
        elif not stat.S_ISREG(st.st_mode):
            message = "is not a regular file (a device, FIFO or socket); give the path of a .jsonl file"
        elif limits is not None and limits.max_file_bytes is not None and st.st_size > limits.max_file_bytes:
            message = _file_too_big(st.st_size, limits.max_file_bytes)
        else:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        message = _os_error_message(path, exc)
    raise DatasetError([Problem(shown, None, message)])


def _scan_file(path, shown: str, max_problems: int, limits: DatasetLimits | None, keep_examples: bool) -> _Scanner:
    scan = _Scanner(shown, max_problems, limits, keep_examples)
    with _open_dataset(path, shown, limits) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
        except (OSError, io.UnsupportedOperation):
            size = None
        scan.run(handle, size)
    return scan


def _file_too_big(size: int, limit: int, grew: bool = False) -> str:
    what = f"grew past {_bytes_text(limit)} while being read" if grew else f"is {_bytes_text(size)}"
    return (
        f"{what}, over the limit of {_bytes_text(limit)} per dataset file; split it into several files (each "
        "becomes a job of the same campaign) or raise GUILD_MAX_DATASET_BYTES"
    )


def _bytes_text(n: int) -> str:
    """``1.5 GiB``, ``512 KiB``, ``37 bytes``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _os_error_message(path: str | os.PathLike, exc: OSError) -> str:
    """Say in words why reading ``path`` failed with ``exc``."""
    if exc.errno == errno.ENOENT:
        if os.path.lexists(path):
            return "no such file (it is a symlink whose target does not exist)"
        return "no such file"
    if exc.errno == errno.ENOTDIR:
        return "no such file (a part of the path before the file name is not a directory)"
    if exc.errno == errno.EISDIR:
        return "is a directory, not a .jsonl file"
    if exc.errno == errno.ELOOP:
        return "symlink loop: the path's symlinks point back at each other; point it at the real file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; make the file (and its folders) readable by the user running Guild"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long"
    return f"cannot read the file: {exc.strerror or exc}"


# ---------------------------------------------------------------------------------------------------------
# Scanning: one pass over the lines


class _Scanner:
    """One streaming pass over one file: checks every line, collects problems in file order, counts or keeps
    the examples, hashes the bytes."""

    def __init__(self, shown: str, max_problems: int, limits: DatasetLimits | None, keep_examples: bool):
        if max_problems < 1:
            raise ValueError(f"max_problems must be at least 1, got {max_problems}")
        self.shown = shown
        self.max_problems = max_problems
        self.limits = limits or DatasetLimits()
        self.keep_examples = keep_examples
        self.problems: list[Problem] = []
        self.omitted = 0
        self.examples: list[Example] = []
        self.num_examples = 0
        self.content_bytes = 0
        self.num_segments = 0
        self.sha256 = ""
        self.file_format = ""  # the format of the first line that has one, and that line
        self.format_line = 0
        self.mixed_reported = False
        self.not_utf8: tuple[int, str] | None = None  # the first line that is not UTF-8 (number, decoded text)
        self.not_utf8_more = 0  # how many lines after it are not UTF-8 either
        self.first_lines: list[tuple[str, bool]] = []  # up to 3 non-blank lines (text, parsed as JSON)
        self.entries = 0  # non-blank lines (a pretty-printed object counts once)

    # -- problems ----------------------------------------------------------------------------------------

    def add(self, line: int | None, message: str) -> None:
        """Record a problem; beyond max_problems only count it."""
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(self.shown, line, message))
        else:
            self.omitted += 1

    def add_file_problem(self, message: str) -> None:
        """Record a whole-file problem: whole-file problems come first, before any line's."""
        self.problems.insert(0, Problem(self.shown, None, message))
        if len(self.problems) > self.max_problems:
            self.problems.pop()
            self.omitted += 1

    def fail(self) -> DatasetError:
        """Return the error listing the problems recorded so far."""
        return DatasetError(self.problems, self.omitted)

    # -- the pass ------------------------------------------------------------------------------------------

    def run(self, stream: BinaryIO, size: int | None) -> None:
        """Check every line of ``stream``; raise DatasetError if anything is wrong."""
        head = stream.read(_HEAD_BYTES)
        if not self._check_head(head):
            raise self.fail()
        first = head.removeprefix(_UTF8_BOM).lstrip(b" \t\r\n")[:1]
        if first == b"[" and size is not None and size <= min(_JSON_ARRAY_PROBE_BYTES, self.limits.max_file_bytes
                                                              or _JSON_ARRAY_PROBE_BYTES):
            stream.seek(0)
            if self._is_json_array(stream.read()):
                raise self.fail()
        stream.seek(0)
        source = LineSource(stream, self.limits.max_line_bytes)
        self._lines(source)  # returns early, without reading the rest, at a NUL byte or a limit
        self.sha256 = source.sha256.hexdigest()  # of the whole file when every line was read
        self._finish()

    def _check_head(self, head: bytes) -> bool:
        """Whole-file checks on the first bytes; False after recording a problem when the file is not text."""
        for magic, what, fix in _MAGIC:
            if head.startswith(magic):
                self.add(None, f"looks like {what}, not a .jsonl file; {fix}")
                return False
        if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
            self.add(None, "looks like UTF-32 (it starts with a UTF-32 byte order mark); save the file as UTF-8")
            return False
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_like_utf16(head):
            self.add(None, "looks like UTF-16; save the file as UTF-8")
            return False
        return True

    def _is_json_array(self, data: bytes) -> bool:
        """Record a problem and return True if the whole file is one JSON array (JSON, not JSON Lines)."""
        try:
            value = json.loads(data.removeprefix(_UTF8_BOM).decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        if not isinstance(value, list):
            return False
        self.add(
            None,
            f"the file is one JSON array (of {len(value)} items); write one JSON object per line (JSON Lines), "
            "e.g. with json.dumps(item) for each item",
        )
        return True

    def _lines(self, source: LineSource) -> None:
        """Check the lines one by one; stop early on a NUL byte or a limit."""
        max_examples, max_bytes = self.limits.max_examples, self.limits.max_file_bytes
        while (line := source.next()) is not None:
            if max_bytes is not None and source.bytes_read > max_bytes:  # it grew since it was opened
                self.add_file_problem(_file_too_big(source.bytes_read, max_bytes, grew=True))
                return
            raw = line.raw
            nul = raw.find(b"\x00")
            if nul >= 0:
                # A binary file: whatever else was found is noise next to that.
                self.problems, self.omitted, self.not_utf8 = [], 0, None
                self.add(
                    line.number,
                    f"holds a NUL byte (0x00 at byte {nul + 1} of the line); this looks like a binary file, not "
                    "UTF-8 JSON Lines",
                )
                return
            if not line.too_long and not raw.strip():
                continue
            self.entries += 1
            if max_examples is not None and self.entries > max_examples:
                self.add_file_problem(
                    f"holds more than {max_examples:,} examples (checked up to line {line.number - 1}); the limit "
                    "is per dataset file: split it into several files (each becomes a job of the same campaign) "
                    "or raise GUILD_MAX_EXAMPLES"
                )
                return
            if line.too_long:
                self.add(line.number, _too_long_message(line, self.limits.max_line_bytes or 0))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._not_utf8(line.number, raw.decode("utf-8", "surrogateescape"))
                continue
            self._line(source, line, text)

    def _line(self, source: LineSource, line: Line, text: str) -> None:
        """Check one decoded, non-blank line."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            self._remember(text, parsed=False)
            end = None
            if exc.pos >= len(text.rstrip()):  # the line is unfinished, not malformed: is it pretty-printed?
                end = _multi_line_object_end(source, line, text, self.limits.max_line_bytes)
            if end is None:
                self.add(line.number, _invalid_json_message(exc, text, truncated=not line.ended))
            else:
                self.add(
                    line.number,
                    f"a JSON object spans lines {line.number}-{end}; write one JSON object per line "
                    "(JSON Lines), e.g. with json.dumps(obj) and no indent",
                )
            return
        except RecursionError:
            self._remember(text, parsed=False)
            self.add(line.number, "invalid JSON: nested too deeply")
            return
        self._remember(text, parsed=True)
        example = self._check_value(value, line.number)
        if example is None:
            return
        self.num_examples += 1
        for segment in _segments(example):
            self.content_bytes += len(segment.encode("utf-8"))
            self.num_segments += 1
        if self.keep_examples:
            self.examples.append(example)

    def _remember(self, text: str, parsed: bool) -> None:
        if len(self.first_lines) < 3:
            self.first_lines.append((text[:_CSV_SNIFF_CHARS], parsed))

    def _not_utf8(self, number: int, decoded: str) -> None:
        """One problem for the whole file: the fix (save as UTF-8) is the same for every line."""
        if self.not_utf8 is None:
            self.not_utf8 = (number, decoded[:_CSV_SNIFF_CHARS])
            self.add(number, _not_utf8_message(decoded, 0))
        else:
            self.not_utf8_more += 1

    def _finish(self) -> None:
        """The checks that need the whole file; raise DatasetError if anything is wrong."""
        if self.not_utf8 is not None and self.not_utf8_more:
            number, decoded = self.not_utf8
            self.problems = [
                Problem(self.shown, number, _not_utf8_message(decoded, self.not_utf8_more))
                if p.line == number and p.message.startswith("not UTF-8") else p
                for p in self.problems
            ]
        delimiter = _looks_like_csv(self.first_lines)
        if delimiter:
            self.add_file_problem(
                f"this looks like {delimiter}, not JSON Lines; convert each row to one JSON object per line, "
                'e.g. {"prompt": "...", "response": "..."}'
            )
        if self.problems or self.omitted:
            raise self.fail()
        if not self.num_examples:
            self.add(None, "no examples; a dataset needs at least one line (one JSON object per line)")
            raise self.fail()

    def _check_value(self, value: object, line: int) -> Example | None:
        """Validate the JSON value of a line; record its problems; return its Example, or None if invalid."""
        if not isinstance(value, dict):
            hint = "; write one example per line, not a list of them" if isinstance(value, list) else ""
            self.add(line, f'expected a JSON object like {{"messages": [...]}}, got {kind(value)}{hint}')
            return None
        fmt, key_problems = line_format(value)
        for message in key_problems:
            self.add(line, message)
        if fmt is None:
            return None
        other_format = False
        if not self.file_format:
            self.file_format, self.format_line = fmt, line
        elif fmt != self.file_format:
            other_format = True
            # Only the first line that differs: past it, every line of the other format would differ too.
            if not self.mixed_reported:
                self.add(
                    line,
                    f"line {line} is {_FORMAT_NAMES[fmt]} format but the file started with "
                    f"{_FORMAT_NAMES[self.file_format]} format at line {self.format_line}; use one format per file",
                )
                self.mixed_reported = True
        # A line of the other format is still checked: its own problems are worth knowing too.
        fields, field_problems = example_fields(fmt, value)
        for message in field_problems:
            self.add(line, message)
        if fields is None or key_problems or other_format:
            return None
        return Example(fmt, line, **fields)


def _looks_like_utf16(data: bytes) -> bool:
    """Return True if ``data`` looks like UTF-16 without a byte order mark: NUL in every other byte."""
    sample = data[:4096]
    if len(sample) < 4:
        return False
    even, odd = sample[0::2], sample[1::2]
    mostly_nul = (even.count(0) >= 0.6 * len(even) and odd.count(0) <= 0.1 * len(odd)) or (
        odd.count(0) >= 0.6 * len(odd) and even.count(0) <= 0.1 * len(even)
    )
    return mostly_nul


def _multi_line_object_end(source: LineSource, line: Line, text: str, max_line_bytes: int | None) -> int | None:
    """The number of the line where a pretty-printed JSON object starting on ``line`` ends, or None.

    Looks ahead through the following lines (given back to ``source`` unless they belong to the object);
    None when no valid JSON object starts there, it ends on the same line, or it would run past the look-ahead
    budget.
    """
    stripped = text.lstrip(" \t\r")
    if not stripped.startswith("{"):
        return None
    budget = max(_PRETTY_MAX_BYTES, 4 * (max_line_bytes or 0))
    taken: list[Line] = []
    parts = [stripped, "\n"]
    size = len(stripped)
    window_goal = _PRETTY_WINDOW_CHARS
    while True:
        # Decode a window of whole lines, doubled while the object runs past it: decoding after every added
        # line would be quadratic in the object's length.
        while size < window_goal:
            nxt = source.next()
            if nxt is None or nxt.too_long or b"\x00" in nxt.raw:
                if nxt is not None:
                    source.push_back([nxt])
                break
            try:
                part = nxt.raw.decode("utf-8")
            except UnicodeDecodeError:
                source.push_back([nxt])
                break
            taken.append(nxt)
            parts += [part, "\n"]
            size += len(part) + 1
        window = "".join(parts)
        try:
            _, end = _DECODER.raw_decode(window)
            break
        except RecursionError:
            source.push_back(taken)
            return None
        except json.JSONDecodeError as exc:
            # A string cannot span lines, so an error before the window's last non-blank character is a real one.
            if size < window_goal or exc.pos < len(window.rstrip()) or size > budget:
                source.push_back(taken)
                return None
            window_goal *= 2
    lines_used = window.count("\n", 0, end)  # newlines before the object's last character
    if lines_used == 0:
        source.push_back(taken)
        return None
    source.push_back(taken[lines_used:])
    return taken[lines_used - 1].number


def _too_long_message(line: Line, limit: int) -> str:
    message = (
        f"the line is longer than {_bytes_text(limit)}, the limit per line (no example needs that much: it would "
        "be cut at the hero's max_length); shorten or split it, or raise GUILD_MAX_LINE_BYTES"
    )
    if b"\r" in line.raw.rstrip(b"\r"):
        message += "; the file seems to end lines with CR only: use LF (or CRLF) line ends"
    return message


def _looks_like_csv(first_lines: list[tuple[str, bool]]) -> str:
    """"CSV (comma-separated values)" (or TSV, ...) when the first lines read as delimited rows, else ""."""
    if not first_lines or any(parsed for _, parsed in first_lines):
        return ""
    texts = [text for text, _ in first_lines]
    if texts[0].lstrip().startswith(("{", "[")):
        return ""
    for delimiter, name in ((",", "CSV (comma-separated values)"), ("\t", "TSV (tab-separated values)"),
                            (";", "CSV (semicolon-separated values)")):
        counts = [text.count(delimiter) for text in texts]
        if counts[0] >= 1 and all(count >= 1 for count in counts):
            return name
    return ""


def _not_utf8_message(line: str, num_other_lines: int) -> str:
    """Describe the first byte of ``line`` (decoded with surrogateescape) that is not UTF-8."""
    match = _ESCAPED_BYTE.search(line)
    assert match is not None
    byte = ord(match.group()) - 0xDC00
    message = f"not UTF-8 (byte 0x{byte:02X} at column {match.start() + 1}); save the file as UTF-8"
    if num_other_lines:
        lines = "1 more line holds" if num_other_lines == 1 else f"{num_other_lines} more lines hold"
        message += f" ({lines} non-UTF-8 bytes)"
    return message


def _invalid_json_message(exc: json.JSONDecodeError, raw: str, truncated: bool) -> str:
    """Describe a line that is not valid JSON, with a hint when the cause is a common one."""
    # Some messages end in "at" already ("Unterminated string starting at").
    message = f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}"
    stripped = raw.strip()
    if "\r" in raw.rstrip("\r"):
        message += "; the file seems to end lines with CR only: use LF (or CRLF) line ends"
    elif truncated:
        message += "; the last line looks truncated (the file does not end with a newline)"
    elif stripped in ("{", "["):
        message += "; the line holds only '" + stripped + "': write one JSON object per line (JSON Lines)"
    return message


def _segments(example: Example) -> tuple[str, ...]:
    """Return the content strings of an example: one per message, prompt and response, or the text."""
    if example.format == "messages":
        return tuple(content for _, content in example.messages)
    if example.format == "prompt_response":
        return (example.prompt, example.response)
    return (example.text,)
