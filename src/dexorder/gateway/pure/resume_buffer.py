"""A session's resume buffer as records: consecutive delta frames merged into one, capped
in bytes, and read back from any frame a client saw.

A streamed reply is thousands of delta frames of a few bytes each. Recorded one by one, a
long reply alone overflowed a buffer that counted frames; merged, it is a few records.
A record covers frames ``first`` to ``last``: one frame as it was sent, or a run of
consecutive delta frames merged into one delta frame holding their content joined. JSON
escapes each character on its own, so joining the escaped contents is escaping the joined
text: merging and cutting are string operations, with no JSON parsed. A merged record keeps
each frame's escaped content length (``cuts``, in UTF-8 bytes), so a client that saw some
of its frames gets only the rest.

The Redis session store does the same merging and trimming in a Lua script, on bytes
(``stores/sessions.py``); its tests run the same cases against both stores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from dexorder.gateway.pure.protocol import encode_delta

DELTA_END: Final = '"}'
DELTA_START: Final = encode_delta("")[: -len(DELTA_END)]
"""How every encoded delta frame begins: ``{"type":"delta","content":"``."""

_FRAMING_BYTES: Final = len(DELTA_START) + len(DELTA_END)  # ASCII: characters are bytes

MERGED_RECORD_BYTES: Final = 4096
"""A run of deltas stops merging at about this size: each merge copies its record, and a
client that saw part of a record is sent the rest of it, not less."""


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def is_delta(text: str) -> bool:
    return text.startswith(DELTA_START) and text.endswith(DELTA_END)


@dataclass(frozen=True, slots=True)
class Record:
    """Frames ``first`` to ``last`` of a session as one entry of its resume buffer.

    ``text`` is one frame as sent (without its ``seq``). For a delta record (one delta
    frame, or several merged), ``cuts`` lists the UTF-8 byte length of each frame's escaped
    content, comma-separated, oldest first; it is empty for any other frame."""

    first: int
    last: int
    text: str
    cuts: str = ""

    @property
    def size(self) -> int:
        """What the record counts against the buffer's byte cap."""
        return utf8_size(self.text) + len(self.cuts)


def record_of(seq: int, frame: str) -> Record:
    """One frame, numbered ``seq``, as a record."""
    if is_delta(frame):
        content = frame[len(DELTA_START) : -len(DELTA_END)]
        return Record(seq, seq, frame, str(utf8_size(content)))
    return Record(seq, seq, frame)


def append_frame(
    records: deque[Record],
    total: int,
    seq: int,
    frame: str,
    cap: int,
    limit: int = MERGED_RECORD_BYTES,
) -> tuple[int, int]:
    """Add ``frame``, numbered ``seq``, to the end of ``records`` (whose sizes sum to
    ``total``) and drop the oldest past ``cap`` bytes (``trim``); returns the new total and
    how many were dropped.

    A delta frame joins the last record when that is a delta record, ends just before
    ``seq``, and the joined text stays within ``limit`` bytes; otherwise it is a record of
    its own. This runs for every streamed token: it builds one record, and counts sizes
    from what changed rather than from the whole text again."""
    tail = records[-1] if records else None
    if tail is not None and tail.cuts and tail.last + 1 == seq and is_delta(frame):
        cut = utf8_size(frame) - _FRAMING_BYTES
        if utf8_size(tail.text) + cut <= limit:
            cuts = f"{tail.cuts},{cut}"
            text = tail.text[: -len(DELTA_END)] + frame[len(DELTA_START) :]
            records[-1] = Record(tail.first, seq, text, cuts)
            total += cut + len(cuts) - len(tail.cuts)
            return trim(records, total, cap) if total > cap else (total, 0)
    record = record_of(seq, frame)
    records.append(record)
    return trim(records, total + record.size, cap)


def frame_after(record: Record, after: int) -> tuple[int, str] | None:
    """The part of ``record`` a client that saw every frame up to ``after`` has not seen,
    as one frame numbered ``record.last``; None when it saw all of it."""
    if record.last <= after:
        return None
    if record.first > after or not record.cuts:
        return record.last, record.text
    lengths = record.cuts.split(",")
    skip = sum(int(length) for length in lengths[: after - record.first + 1])
    content = record.text[len(DELTA_START) : -len(DELTA_END)].encode()[skip:].decode()
    return record.last, DELTA_START + content + DELTA_END


def frames_after(records: Iterable[Record], after: int) -> list[tuple[int, str]]:
    """Every frame of ``records`` (oldest first) after ``after``, cut where a client saw part."""
    return [frame for record in records if (frame := frame_after(record, after)) is not None]


def complete(records: Iterable[Record], after: int, last: int) -> bool:
    """Whether ``records`` (oldest first, each ending after ``after``) cover every frame
    after ``after`` up to ``last``, none missing."""
    expected = after + 1
    for record in records:
        if record.first > expected:
            return False
        expected = max(expected, record.last + 1)
    return expected > last


def trim(records: deque[Record], total: int, cap: int) -> tuple[int, int]:
    """Drop the oldest of ``records`` until their ``total`` size is within ``cap`` bytes,
    always keeping the newest; returns the new total and how many were dropped."""
    dropped = 0
    while total > cap and len(records) > 1:
        total -= records.popleft().size
        dropped += 1
    return total, dropped


__all__ = [
    "DELTA_END",
    "DELTA_START",
    "MERGED_RECORD_BYTES",
    "Record",
    "append_frame",
    "complete",
    "frame_after",
    "frames_after",
    "is_delta",
    "record_of",
    "trim",
    "utf8_size",
]
