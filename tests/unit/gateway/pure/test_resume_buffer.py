"""The resume buffer's records: deltas merged, cut where a client saw part, capped in bytes."""

from __future__ import annotations

import json
from collections import deque

from dexorder.gateway.pure.protocol import Stage, StatusFrame, encode_delta, encode_frame
from dexorder.gateway.pure.resume_buffer import (
    MERGED_RECORD_BYTES,
    Record,
    append_frame,
    complete,
    frame_after,
    frames_after,
    record_of,
    trim,
)

# Escapes and multi-byte characters: cut at the wrong place, either breaks the JSON.
PIECES = ["Hello", ' "quoted"', "\n", "naïve ", "€uro", "\\", " 🙂 end"]


def merge_all(first_seq: int, pieces: list[str]) -> Record:
    records: deque[Record] = deque()
    total = 0
    for offset, piece in enumerate(pieces):
        total, _ = append_frame(records, total, first_seq + offset, encode_delta(piece), 1 << 20)
    assert len(records) == 1
    assert total == records[0].size
    return records[0]


def joined(records: list[Record], seq: int, frame: str) -> bool:
    """Whether ``frame`` joins the last of ``records`` (rather than a record of its own)."""
    kept = deque(records)
    append_frame(kept, sum(record.size for record in kept), seq, frame, 1 << 20)
    return len(kept) == len(records)


def content(frame: tuple[int, str] | None) -> str:
    assert frame is not None
    loaded = json.loads(frame[1])
    assert loaded["type"] == "delta"
    return str(loaded["content"])


def test_consecutive_deltas_merge_into_one_delta_frame() -> None:
    record = merge_all(5, PIECES)
    assert (record.first, record.last) == (5, 5 + len(PIECES) - 1)
    assert record.text == encode_delta("".join(PIECES))
    assert len(record.cuts.split(",")) == len(PIECES)


def test_a_client_that_saw_part_of_a_record_gets_exactly_the_rest() -> None:
    record = merge_all(5, PIECES)
    for seen in range(len(PIECES)):
        after = 5 + seen - 1  # it saw pieces[:seen]
        frame = frame_after(record, after)
        assert content(frame) == "".join(PIECES[seen:])
        assert frame is not None
        assert frame[0] == record.last
    assert frame_after(record, record.last) is None


def test_only_consecutive_deltas_within_the_limit_merge() -> None:
    delta = record_of(1, encode_delta("a"))
    status = encode_frame(StatusFrame(stage=Stage.RESUMED, message="m"))
    done = record_of(2, status)
    assert done.cuts == ""
    assert not joined([delta], 2, status)  # not a delta
    assert not joined([done], 3, encode_delta("b"))  # after a non-delta
    assert not joined([delta], 3, encode_delta("b"))  # frame 2 between
    big = record_of(1, encode_delta("x" * (MERGED_RECORD_BYTES - 60)))
    assert joined([big], 2, encode_delta("y" * 20))
    assert not joined([big], 2, encode_delta("y" * 60))  # over the limit


def test_the_total_kept_is_the_records_sizes_and_the_cap_holds() -> None:
    """``append_frame`` counts sizes from what changed: the sum must stay exact, with
    multi-byte text, merges, frames of their own and trimming."""
    records: deque[Record] = deque()
    total, seq, cap = 0, 0, 600
    for round_ in range(40):
        for piece in PIECES:
            seq += 1
            total, _ = append_frame(records, total, seq, encode_delta(piece), cap, limit=200)
            assert total == sum(record.size for record in records)
        seq += 1
        total, _ = append_frame(records, total, seq, f'{{"type":"done","n":{round_}}}', cap)
        assert total == sum(record.size for record in records)
        assert total <= cap
    assert records[-1].last == seq


def test_a_replay_is_complete_only_when_nothing_after_the_client_is_missing() -> None:
    records = [merge_all(1, ["a", "b", "c"]), record_of(4, '{"type":"done"}')]
    assert complete(records, 0, 4)
    assert complete(records[1:], 3, 4)
    assert complete([records[0]], 1, 3)  # inside the merged record
    assert not complete(records[1:], 0, 4)  # frames 1 to 3 dropped: the start is gone
    assert not complete(records, 0, 5)  # frame 5 never recorded
    assert [seq for seq, _ in frames_after(records, 2)] == [3, 4]


def test_the_oldest_records_are_dropped_to_stay_within_the_cap_the_newest_always_stays() -> None:
    records = deque(record_of(seq, "x" * 10) for seq in range(1, 6))
    total, dropped = trim(records, 50, 30)
    assert (total, dropped) == (30, 2)
    assert [record.first for record in records] == [3, 4, 5]
    huge = deque([record_of(1, "x" * 100)])
    assert trim(huge, 100, 30) == (100, 0)
    assert len(huge) == 1


def test_a_record_counts_its_utf8_bytes() -> None:
    assert record_of(1, encode_delta("€")).size == len(encode_delta("€").encode()) + 1
