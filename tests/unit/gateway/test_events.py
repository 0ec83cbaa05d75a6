"""The JSON-lines event sink, the fallback without Kafka, and the order the Kafka sink
feeds its producer in."""

from __future__ import annotations

import contextlib
import datetime as dt
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.gateway.events import (
    RETRY_MAX_SECONDS,
    RETRY_MIN_SECONDS,
    EventsRefused,
    JsonlSink,
    ProducerFeed,
)
from dexorder.gateway.pure.events import UserMessageEvent, event_from_json
from dexorder.gateway.spool import Outgoing, SpooledRecord


def message(content: str) -> UserMessageEvent:
    return UserMessageEvent(
        occurred_at=dt.datetime.now(dt.UTC),
        user_id="user-1",
        session_id="s",
        turn_id="t",
        channel="websocket",
        content=content,
    )


async def test_events_are_appended_as_json_lines_in_a_file_per_day(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "events")
    sent = [message("one"), message("two\nlines")]
    try:
        await sink.publish(sent[:1])
        await sink.publish(sent[1:])
        await sink.publish([])
    finally:
        await sink.close()
    path = sink.path_for(dt.datetime.now(dt.UTC).date())
    lines = path.read_bytes().splitlines()
    assert [event_from_json(line) for line in lines] == sent
    assert sink.backlog == 0
    assert await sink.healthy()


async def test_a_reopened_sink_appends_to_the_same_file(tmp_path: Path) -> None:
    for content in ("first", "second"):
        sink = JsonlSink(tmp_path)
        await sink.publish([message(content)])
        await sink.close()
    path = sink.path_for(dt.datetime.now(dt.UTC).date())
    contents = [
        getattr(event_from_json(line), "content", None) for line in path.read_bytes().splitlines()
    ]
    assert contents == ["first", "second"]


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail (EFBIG), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


async def test_a_write_that_fails_leaves_no_half_line_and_is_refused(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    await sink.publish([message("kept")])
    path = sink.path_for(dt.datetime.now(dt.UTC).date())
    whole = path.stat().st_size
    try:
        with file_size_limit(whole + 40), pytest.raises(EventsRefused):
            await sink.publish([message("x" * 500)])
        assert path.read_bytes().endswith(b"\n")
        await sink.publish([message("after")])  # the sink recovers once writes succeed
    finally:
        await sink.close()
    contents = [
        getattr(event_from_json(line), "content", None) for line in path.read_bytes().splitlines()
    ]
    assert contents == ["kept", "after"]


def spooled(segment: int, index: int) -> SpooledRecord:
    return SpooledRecord(segment, index, Outgoing("topic", "user-1", f"e{segment}.{index}", b"{}"))


def drain(feed: ProducerFeed, now: float) -> list[SpooledRecord]:
    taken = []
    while (record := feed.due(now)) is not None:
        taken.append(record)
        feed.sent()
    return taken


def test_a_restarted_feed_gives_every_unacknowledged_record_once_oldest_first() -> None:
    feed = ProducerFeed()
    feed.restart([], 0.0, backoff=False)
    feed.add(spooled(0, 0))
    feed.add(spooled(0, 1))
    assert drain(feed, 0.0) == [spooled(0, 0), spooled(0, 1)]
    # Record 0.0 failed: everything unacknowledged goes again, with the newest spooled one.
    unacknowledged = [spooled(0, 0), spooled(0, 1), spooled(1, 0)]
    feed.restart(unacknowledged, 10.0, backoff=True)
    # The inbox still held 0.1 and 1.0 (spooled before the restart read the spool): skipped.
    feed.add(spooled(0, 1))
    feed.add(spooled(1, 0))
    feed.add(spooled(1, 1))
    assert feed.due(10.0) is None  # the back-off: nothing, not even a newer record, goes first
    assert drain(feed, 10.5) == [*unacknowledged, spooled(1, 1)]


def test_the_back_off_doubles_up_to_its_maximum_and_resets_on_a_delivery() -> None:
    feed = ProducerFeed()
    waits = []
    for attempt in range(8):
        feed.restart([spooled(0, 0)], float(attempt * 100), backoff=True)
        start = attempt * 100
        waits.append(next(t / 10 for t in range(0, 200) if feed.due(start + t / 10) is not None))
    assert waits == [
        RETRY_MIN_SECONDS,
        1.0,
        2.0,
        4.0,
        8.0,
        RETRY_MAX_SECONDS,
        RETRY_MAX_SECONDS,
        RETRY_MAX_SECONDS,
    ]
    feed.delivered()
    feed.restart([spooled(0, 0)], 1000.0, backoff=True)
    assert feed.due(1000.0 + RETRY_MIN_SECONDS) is not None


def test_a_paused_feed_keeps_its_record_for_later() -> None:
    feed = ProducerFeed()
    feed.restart([spooled(0, 0), spooled(0, 1)], 0.0, backoff=False)
    assert feed.due(0.0) == spooled(0, 0)
    feed.wait(1.0)  # the client's queue was full: 0.0 was not taken
    assert feed.due(0.5) is None
    assert drain(feed, 1.0) == [spooled(0, 0), spooled(0, 1)]
    assert len(feed) == 0
