"""A bounded, append-only spool on disk for records the broker has not yet acknowledged.

Records are appended to numbered segment files (``0000000001.seg``), one line each; a
record's acknowledgement is appended to the segment's ``.ack`` file. Nothing is ever
rewritten: a segment is deleted whole once it is sealed (a newer one is being written)
and every record in it is acknowledged. On open, every record without an acknowledgement
is handed back to be sent again, so a crash or a broker outage loses nothing; a record
acknowledged just before a crash may be sent twice, which its event id makes harmless.

Bounded in bytes on disk (``max_bytes``, the volume it lives on): a record that would
pass the cap makes room by shedding the oldest segments whole, and the records shed are
counted (``shed``), so a long broker outage costs the oldest events, never chat. Appends
reach the OS at once; ``sync`` makes them durable (``fsync``), and the caller groups many
appends into one sync (``GroupCommit``). Segment files are synced before they are sealed.

Thread-safe: records are appended on the event loop and acknowledged from the Kafka
client's delivery callbacks, on another thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_SEGMENT_SUFFIX = ".seg"
_ACK_SUFFIX = ".ack"
_FIELDS = 5


class SpoolFull(Exception):
    """One batch is larger than the whole spool may be; it was refused."""


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
    def __init__(self, directory: Path, *, max_bytes: int, segment_records: int = 1000) -> None:
        if max_bytes < 1 or segment_records < 1:
            raise ValueError("max_bytes and segment_records must be at least 1")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_records = segment_records
        self._lock = threading.Lock()
        self._pending: dict[int, set[int]] = {}
        self._sizes: dict[int, int] = {}  # bytes of each segment file on disk
        self._acks: dict[int, IO[str]] = {}
        self._active = 0
        self._active_file: IO[str] | None = None
        self._active_count = 0
        self._backlog = 0
        self._bytes = 0
        self._opened = False
        self._shedding = False
        self.shed = 0  # records given up to stay under max_bytes, since open

    @property
    def backlog(self) -> int:
        """Records appended and not yet acknowledged."""
        return self._backlog

    @property
    def size(self) -> int:
        """Bytes of the segment files on disk."""
        return self._bytes

    @property
    def full(self) -> bool:
        """At the cap, or shedding since the backlog was last empty: what to alert on."""
        return self._shedding or self._bytes >= self.max_bytes

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
            self._sizes[segment] = self._path(segment, _SEGMENT_SUFFIX).stat().st_size
            recovered.extend(pending)
        self._backlog = len(recovered)
        self._bytes = sum(self._sizes.values())
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
        """Write records to the spool (all or none), shedding the oldest segments to stay
        under ``max_bytes``; raises ``SpoolFull`` for a batch larger than the cap."""
        values = [_check(outgoing) for outgoing in items]
        with self._lock:
            if not self._opened:
                raise SpoolError("the spool is not open")
            needed = self._bytes_of(items, values)
            if needed > self.max_bytes:
                raise SpoolFull(
                    f"{len(items)} records of {needed} bytes exceed the whole event spool "
                    f"(at most {self.max_bytes} bytes); refused"
                )
            self._make_room(needed)
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

    def _bytes_of(self, items: Sequence[Outgoing], values: list[str]) -> int:
        """The bytes ``append`` will write for ``items``, with the indices they will get."""
        count = self._active_count if self._active_file is not None else self.segment_records
        total = 0
        for outgoing, value in zip(items, values, strict=True):
            if count >= self.segment_records:
                count = 0
            total += len(_encode(count, outgoing, value).encode())
            count += 1
        return total

    def _make_room(self, needed: int) -> None:
        """Shed the oldest segments, whole, until ``needed`` more bytes fit."""
        while self._bytes + needed > self.max_bytes:
            older = sorted(segment for segment in self._sizes if segment != self._active)
            if not older:
                return  # only the segment being written: the cap is passed by this batch
            oldest = older[0]
            lost = len(self._pending.get(oldest, ()))
            self._shedding = True
            self.shed += lost
            self._backlog -= lost
            logger.error(
                "event spool at its cap of %d bytes: %d unsent records of segment %d shed",
                self.max_bytes,
                lost,
                oldest,
            )
            self._forget(oldest)

    def _write(self, lines: list[str]) -> None:
        assert self._active_file is not None
        text = "".join(lines)
        self._active_file.write(text)
        # Flushed to the OS: it survives the process dying; ``sync`` survives the machine.
        self._active_file.flush()
        written = len(text.encode())
        self._sizes[self._active] = self._sizes.get(self._active, 0) + written
        self._bytes += written

    def _rotate(self) -> None:
        if self._active_file is not None:
            # Sealed durable: a sync only covers the segment being written.
            os.fsync(self._active_file.fileno())
            self._active_file.close()
            sealed = self._active
            self._active += 1
            if not self._pending.get(sealed):
                self._forget(sealed)
        self._active_file = self._path(self._active, _SEGMENT_SUFFIX).open("a", encoding="utf-8")
        self._active_count = 0
        self._sizes.setdefault(self._active, 0)
        _sync_directory(self.directory)

    def sync(self) -> None:
        """Make every record appended so far durable (one ``fsync``, off the lock)."""
        with self._lock:
            if self._active_file is None:
                return
            descriptor = os.dup(self._active_file.fileno())
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def unacknowledged(self) -> list[SpooledRecord]:
        """Every record not yet acknowledged, oldest first, read back from disk (to give
        a new producer after the old one failed)."""
        with self._lock:
            if self._active_file is not None:
                self._active_file.flush()
            pending = {segment: set(indices) for segment, indices in self._pending.items()}
            records: list[SpooledRecord] = []
            for segment in sorted(pending):
                records.extend(
                    record
                    for record in self._read_segment(segment)
                    if record.index in pending[segment]
                )
            return records

    def ack(self, record: SpooledRecord) -> None:
        """The broker has the record: never send it again."""
        with self._lock:
            pending = self._pending.get(record.segment)
            if pending is None or record.index not in pending:
                return
            pending.discard(record.index)
            self._backlog -= 1
            if not self._backlog:
                self._shedding = False
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
        self._bytes -= self._sizes.pop(segment, 0)
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
                os.fsync(self._active_file.fileno())
                self._active_file.close()
                self._active_file = None
                if not self._pending.get(self._active):
                    self._forget(self._active)
            for acks in self._acks.values():
                acks.close()
            self._acks.clear()
            self._opened = False


def _sync_directory(directory: Path) -> None:
    """A new segment's name durable in its directory (where the platform allows it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class GroupCommit:
    """Many appends made durable by one ``sync``: a caller waits for a sync that began
    after its append; while one runs, the appends that arrive meanwhile share the next.
    ``sync`` runs in a thread, so the event loop never waits on the disk."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._appended = 0
        self._synced = 0
        self._running: asyncio.Task[None] | None = None

    async def durable(self) -> None:
        """Return once everything appended before this call is synced."""
        self._appended += 1
        target = self._appended
        while self._synced < target:
            if self._running is None:
                self._running = asyncio.create_task(self._run(), name="spool-sync")
            await asyncio.shield(self._running)

    async def _run(self) -> None:
        upto = self._appended
        try:
            await asyncio.to_thread(self._sync)
            self._synced = max(self._synced, upto)
        finally:
            self._running = None
