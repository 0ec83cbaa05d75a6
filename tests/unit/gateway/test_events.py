"""The JSON-lines event sink, the fallback without Kafka."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from dexorder.core.events import UserMessageEvent, event_from_json
from dexorder.gateway.events import JsonlSink


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
