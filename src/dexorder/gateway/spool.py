"""A bounded, append-only spool on disk for records the broker has not yet acknowledged.

Records are appended to numbered segment files (``0000000001.seg``), one line each; a
record's acknowledgement is appended to the segment's ``.ack`` file. Nothing is ever
rewritten: a segment is deleted whole once it is sealed (a newer one is being written)
and every record in it is acknowledged. On open, every record without an acknowledgement
is handed back to be sent again, so a crash or a broker outage loses nothing; a record
acknowledged just before a crash may be sent twice, which its event id makes harmless.

Thread-safe: records are appended on the event loop and acknowledged from the Kafka
client's delivery callbacks, on another thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_SEGMENT_SUFFIX = ".seg"
_ACK_SUFFIX = ".ack"
_FIELDS = 5


class SpoolFull(Exception):
    """The spool holds its maximum of unacknowledged records; the new ones were refused."""


class SpoolError(Exception):
    """The spool's directory cannot be used."""


@dataclass(frozen=True)
class Outgoing:
    """A record to send: where to, under which key, with which id and bytes."""

    topic: str
    key: str
    record_id: str
    value: bytes


@dataclass(frozen=True)
class SpooledRecord:
    segment: int
    index: int
    outgoing: Outgoing


def _check_field(name: str, text: str) -> None:
    # One record is one line of tab-separated fields: no field may hold either.
    if "\t" in text or "\n" in text or "\r" in text:
        raise ValueError(f"a spooled record's {name} must not hold tabs or line breaks")


def _check(outgoing: Outgoing) -> str:
    """The record's value as text, once every field is known to fit on one line."""
    value = outgoing.value.decode()
    for name, text in (
        ("topic", outgoing.topic),
        ("key", outgoing.key),
        ("id", outgoing.record_id),
        ("value", value),
    ):
        _check_field(name, text)
    return value


def _encode(index: int, outgoing: Outgoing, value: str) -> str:
    return f"{index}\t{outgoing.topic}\t{outgoing.key}\t{outgoing.record_id}\t{value}\n"


def _decode(line: str) -> tuple[int, Outgoing] | None:
    fields = line.rstrip("\n").split("\t", _FIELDS - 1)
    if len(fields) != _FIELDS or not fields[0].isdigit():
        return None
    index, topic, key, record_id, value = fields
    return int(index), Outgoing(topic, key, record_id, value.encode())


class Spool:
    def __init__(self, directory: Path, *, max_records: int, segment_records: int = 1000) -> None:
        if max_records < 1 or segment_records < 1:
            raise ValueError("max_records and segment_records must be at least 1")
        self.directory = directory
        self.max_records = max_records
        self.segment_records = segment_records
        self._lock = threading.Lock()
        self._pending: dict[int, set[int]] = {}
        self._acks: dict[int, IO[str]] = {}
        self._active = 0
        self._active_file: IO[str] | None = None
        self._active_count = 0
        self._backlog = 0
        self._opened = False

    @property
    def backlog(self) -> int:
        """Records appended and not yet acknowledged."""
        return self._backlog

    @property
    def full(self) -> bool:
        return self._backlog >= self.max_records

    def _path(self, segment: int, suffix: str) -> Path:
        return self.directory / f"{segment:010d}{suffix}"

    def open(self) -> list[SpooledRecord]:
        """Read what earlier runs left unacknowledged; returns it, oldest first, to resend."""
        with self._lock:
            if self._opened:
                raise SpoolError("the spool is already open")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                recovered = self._recover()
            except OSError as error:
                raise SpoolError(f"cannot use the spool at {self.directory}: {error}") from error
            self._opened = True
            return recovered

    def _recover(self) -> list[SpooledRecord]:
        segments = sorted(
            int(path.stem)
            for path in self.directory.glob(f"*{_SEGMENT_SUFFIX}")
            if path.stem.isdigit()
        )
        recovered: list[SpooledRecord] = []
        for segment in segments:
            acked = self._read_acks(segment)
            records = self._read_segment(segment)
            pending = [record for record in records if record.index not in acked]
            if not pending:
                self._delete(segment)
                continue
            self._pending[segment] = {record.index for record in pending}
            recovered.extend(pending)
        self._backlog = len(recovered)
        self._active = (segments[-1] if segments else 0) + 1
        return recovered

    def _read_acks(self, segment: int) -> set[int]:
        path = self._path(segment, _ACK_SUFFIX)
        if not path.exists():
            return set()
        return {int(line) for line in path.read_text().split() if line.isdigit()}

    def _read_segment(self, segment: int) -> list[SpooledRecord]:
        records = []
        with self._path(segment, _SEGMENT_SUFFIX).open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                decoded = _decode(line) if line.endswith("\n") else None
                if decoded is None:
                    # A line torn by a crash mid-write: its event never reached anyone.
                    logger.warning(
                        "spool segment %d line %d is incomplete; skipped", segment, number
                    )
                    continue
                index, outgoing = decoded
                records.append(SpooledRecord(segment, index, outgoing))
        return records

    def append(self, items: Sequence[Outgoing]) -> list[SpooledRecord]:
        """Write records durably to the spool (all or none); raises ``SpoolFull``."""
        values = [_check(outgoing) for outgoing in items]
        with self._lock:
            if not self._opened:
                raise SpoolError("the spool is not open")
            if self._backlog + len(items) > self.max_records:
                raise SpoolFull(
                    f"the event spool holds {self._backlog} unsent records "
                    f"(at most {self.max_records}); {len(items)} refused"
                )
            records = []
            lines: list[str] = []
            for outgoing, value in zip(items, values, strict=True):
                if self._active_file is None or self._active_count >= self.segment_records:
                    if lines:
                        self._write(lines)
                        lines = []
                    self._rotate()
                record = SpooledRecord(self._active, self._active_count, outgoing)
                lines.append(_encode(record.index, outgoing, value))
                self._pending.setdefault(self._active, set()).add(record.index)
                self._active_count += 1
                records.append(record)
            self._write(lines)
            self._backlog += len(records)
            return records

    def _write(self, lines: list[str]) -> None:
        assert self._active_file is not None
        self._active_file.write("".join(lines))
        # Flushed to the OS: it survives the process dying (not the machine losing power).
        self._active_file.flush()

    def _rotate(self) -> None:
        if self._active_file is not None:
            self._active_file.close()
            sealed = self._active
            self._active += 1
            if not self._pending.get(sealed):
                self._forget(sealed)
        self._active_file = self._path(self._active, _SEGMENT_SUFFIX).open("a", encoding="utf-8")
        self._active_count = 0

    def ack(self, record: SpooledRecord) -> None:
        """The broker has the record: never send it again."""
        with self._lock:
            pending = self._pending.get(record.segment)
            if pending is None or record.index not in pending:
                return
            pending.discard(record.index)
            self._backlog -= 1
            if not pending and record.segment != self._active:
                self._forget(record.segment)
                return
            acks = self._acks.get(record.segment)
            if acks is None:
                acks = self._path(record.segment, _ACK_SUFFIX).open("a", encoding="utf-8")
                self._acks[record.segment] = acks
            acks.write(f"{record.index}\n")
            acks.flush()

    def _forget(self, segment: int) -> None:
        self._pending.pop(segment, None)
        acks = self._acks.pop(segment, None)
        if acks is not None:
            acks.close()
        self._delete(segment)

    def _delete(self, segment: int) -> None:
        for suffix in (_SEGMENT_SUFFIX, _ACK_SUFFIX):
            self._path(segment, suffix).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._active_file is not None:
                self._active_file.close()
                self._active_file = None
                if not self._pending.get(self._active):
                    self._forget(self._active)
            for acks in self._acks.values():
                acks.close()
            self._acks.clear()
            self._opened = False
