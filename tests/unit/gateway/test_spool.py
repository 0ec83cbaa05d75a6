"""The event spool: append, acknowledge, seal and delete segments, recover after a stop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.gateway.spool import GroupCommit, Outgoing, Spool, SpoolFull


def item(n: int) -> Outgoing:
    return Outgoing("topic", f"user-{n % 3}", f"{n:032x}", f'{{"n": {n}}}'.encode())


class Spools:
    """Opens spools for a test and closes every one at its end."""

    def __init__(self) -> None:
        self.opened: list[Spool] = []

    def open(self, directory: Path, *, max_bytes: int = 1 << 20, segment_records: int = 4) -> Spool:
        spool = Spool(directory, max_bytes=max_bytes, segment_records=segment_records)
        self.opened.append(spool)
        return spool


@pytest.fixture
def spools() -> Iterator[Spools]:
    made = Spools()
    yield made
    for spool in made.opened:
        spool.close()


def test_appended_records_count_until_acknowledged(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path)
    assert spool.open() == []
    records = spool.append([item(n) for n in range(3)])
    assert spool.backlog == 3
    spool.ack(records[1])
    spool.ack(records[1])  # a repeated report changes nothing
    assert spool.backlog == 2


def test_unacknowledged_records_come_back_after_a_restart(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path)
    assert spool.open() == []
    records = spool.append([item(n) for n in range(10)])
    for record in records[:7]:
        spool.ack(record)
    spool.close()

    again = spools.open(tmp_path)
    recovered = again.open()
    assert [r.outgoing for r in recovered] == [item(n) for n in range(7, 10)]
    assert again.backlog == 3


def test_a_sealed_segment_is_deleted_once_every_record_is_acknowledged(
    tmp_path: Path, spools: Spools
) -> None:
    spool = spools.open(tmp_path, segment_records=2)
    assert spool.open() == []
    records = spool.append([item(n) for n in range(5)])  # segments of 2, 2 and 1
    assert len(list(tmp_path.glob("*.seg"))) == 3
    for record in records[:4]:
        spool.ack(record)
    # The two sealed segments are gone; the active one stays.
    assert len(list(tmp_path.glob("*.seg"))) == 1
    spool.ack(records[4])
    spool.close()
    assert spools.open(tmp_path).open() == []
    assert list(tmp_path.iterdir()) == []


def line_bytes(spool_dir: Path) -> int:
    return sum(path.stat().st_size for path in spool_dir.glob("*.seg"))


def test_a_full_spool_sheds_its_oldest_segments_and_counts_them(
    tmp_path: Path, spools: Spools
) -> None:
    # About 57 bytes a record: room for ten, in segments of four.
    spool = spools.open(tmp_path, max_bytes=580)
    assert spool.open() == []
    for n in range(14):
        spool.append([item(n)])
        assert spool.size == line_bytes(tmp_path) <= 580
    assert spool.shed > 0
    assert spool.shed % 4 == 0  # whole segments, the oldest
    assert spool.backlog + spool.shed == 14
    spool.close()
    recovered = spools.open(tmp_path, max_bytes=580).open()
    assert [r.outgoing for r in recovered] == [item(n) for n in range(spool.shed, 14)]


def test_a_batch_larger_than_the_whole_spool_is_refused(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path, max_bytes=100)
    assert spool.open() == []
    with pytest.raises(SpoolFull, match="at most 100 bytes"):
        spool.append([item(0), item(1)])
    assert spool.backlog == 0
    assert spool.shed == 0


def test_unacknowledged_records_are_read_back_in_order(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path)
    assert spool.open() == []
    records = spool.append([item(n) for n in range(6)])
    spool.ack(records[1])
    spool.ack(records[4])
    assert [r.outgoing for r in spool.unacknowledged()] == [item(n) for n in (0, 2, 3, 5)]


async def test_concurrent_appends_share_one_sync() -> None:
    started: list[int] = []
    gate = threading.Event()

    def sync() -> None:
        started.append(len(started))
        gate.wait(5)

    commit = GroupCommit(sync)
    first = asyncio.create_task(commit.durable())
    await asyncio.sleep(0.05)  # its sync is running
    later = [asyncio.create_task(commit.durable()) for _ in range(20)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, *later)
    # The first sync began before the twenty: they all share the second one.
    assert len(started) == 2


def test_a_torn_last_line_is_skipped(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path)
    assert spool.open() == []
    spool.append([item(0)])
    spool.close()
    segment = next(tmp_path.glob("*.seg"))
    with segment.open("a") as file:
        file.write('1\ttopic\tkey\tid\t{"half')
    recovered = spools.open(tmp_path).open()
    assert [r.outgoing for r in recovered] == [item(0)]


def test_fields_with_line_breaks_are_refused(tmp_path: Path, spools: Spools) -> None:
    spool = spools.open(tmp_path)
    assert spool.open() == []
    with pytest.raises(ValueError, match="key"):
        spool.append([Outgoing("topic", "bad\nkey", "id", b"{}")])
    assert spool.backlog == 0
