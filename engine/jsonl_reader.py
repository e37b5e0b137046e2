"""Reading a JSON Lines file one line at a time, in constant memory, hashing every byte on the way.

:class:`LineSource` is the mechanism under :mod:`engine.formats`: it splits a binary stream at ``\\n`` (never
at ``\\r`` or U+2028: JSON strings may hold those), numbers the lines from 1, drops a leading UTF-8 byte order
mark, caps the length of a line (the rest of an overlong line is read and hashed but never held), counts the
bytes and lets the caller look ahead and push lines back (a pretty-printed object spans several lines).
Standard library only.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

UTF8_BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 256 * 1024  # read at a time


@dataclass(frozen=True)
class Line:
    """One line of the file.

    ``raw`` holds the line's bytes without its ``\\n`` (and without the BOM on line 1); for an overlong line,
    only its head (the rest is skipped when the next line is read, so a caller that stops there reads no more).
    """

    number: int
    raw: bytes
    ended: bool  # a "\n" ended it (False only for a last line without a final newline)
    too_long: bool = False


class LineSource:
    """The lines of ``stream``, in order, with look-ahead and push-back.

    Reads in chunks and splits them (much faster than a ``readline`` per line); never holds more than one chunk
    plus ``max_line_bytes`` of one line.

    Args:
        stream: a binary file object positioned at the start of the data.
        max_line_bytes: lines longer than this come back with ``too_long`` set (None: no cap).
    """

    def __init__(self, stream: BinaryIO, max_line_bytes: int | None = None):
        self._stream = stream
        self._cap = max_line_bytes
        self._pending: deque[Line] = deque()
        self._number = 0
        self._done = False
        self._carry = b""  # the start of a line whose end is in a later chunk
        self._skipping = False  # inside an overlong line already returned: drop bytes up to its end
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def next(self) -> Line | None:
        """The next line, or None at the end of the data."""
        while not self._pending:
            if self._done:
                return None
            self._fill()
        return self._pending.popleft()

    def push_back(self, lines: list[Line]) -> None:
        """Give lines taken with :meth:`next` back, to be returned again in the same order."""
        self._pending.extendleft(reversed(lines))

    def _fill(self) -> None:
        """Read one chunk and queue the lines it completes (or an overlong line as soon as it is known)."""
        chunk = self._stream.read(CHUNK_BYTES)
        self.sha256.update(chunk)
        self.bytes_read += len(chunk)
        if not chunk:
            self._done = True
            if self._carry and not self._skipping:
                self._emit(self._carry, ended=False)
            self._carry = b""
            return
        if self._skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            chunk, self._skipping = chunk[newline + 1:], False
        parts = (self._carry + chunk).split(b"\n")
        self._carry = parts.pop()
        for part in parts:
            self._emit(part, ended=True)
        if self._cap is not None and len(self._carry) > self._cap + 1:
            # Overlong and not finished: return its head now, drop the rest as it comes (a caller that stops at
            # this line reads no more of the file).
            self._emit(self._carry[: self._cap + 2], ended=True, overlong=True)
            self._carry, self._skipping = b"", True

    def _emit(self, body: bytes, ended: bool, overlong: bool = False) -> None:
        self._number += 1
        if self._number == 1 and body.startswith(UTF8_BOM):
            body = body[len(UTF8_BOM):]
        too_long = overlong or (self._cap is not None and len(body) > self._cap
                                and len(body.rstrip(b"\r")) > self._cap)
        self._pending.append(Line(self._number, body, ended, too_long))
