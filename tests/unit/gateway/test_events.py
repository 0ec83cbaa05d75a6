"""The JSON-lines event sink, the fallback without Kafka."""

from __future__ import annotations

import contextlib
import datetime as dt
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dexorder.gateway.events import EventsRefused, JsonlSink
from dexorder.gateway.pure.events import UserMessageEvent, event_from_json


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
