"""Server-Sent Events as every stream is read (a model's reply, an MCP server's answers)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from dexorder.gateway.sse import SSEReader


def events_line_by_line(stream: bytes) -> list[bytes]:
    """The events of a whole stream as the transport read them before: line by line, as
    aiohttp's ``readline`` gives them (split after each ``\\n``, the last line as it is)."""
    parts = stream.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    data: list[bytes] = []
    events = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
            continue
        if line or not data:
            continue
        events.append(b"\n".join(data))
        data = []
    return events


def events_of_blocks(blocks: list[bytes], limit: int = 1 << 20) -> list[bytes]:
    reader = SSEReader(limit)
    events = [event for block in blocks for event in reader.feed(block)]
    return events + reader.end()


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


STREAMS = [
    b"".join(
        sse_event({"id": "c", "choices": [{"delta": {"content": f"token {n}"}}]}) for n in range(5)
    )
    + b"data: [DONE]\n\n",
    b': keep-alive\n\ndata: {"a": 1}\r\n\r\nevent: x\nid: 3\ndata:{"b": 2}\n\n\n\n',
    b"data: line one\ndata:  line two\n\ndata: last, never ended\n",
    b"data: lone carriage return at the end\n\r",
    b"data:  one\r\n\ndata:two\r\r\n\n: comment\n\n",
    b"data: no newline at all",
    b"\n\n\ndata: x\n\ndata: y\n\n",
    b"data: \xc3\xa9\xf0\x9f\x98\x80 split inside characters\n\n",
]


@pytest.mark.parametrize("stream", STREAMS, ids=lambda stream: repr(stream[:24]))
def test_events_are_read_as_line_by_line_however_the_bytes_arrive(stream: bytes) -> None:
    expected = events_line_by_line(stream)
    assert events_of_blocks([stream]) == expected
    # Each event in a block of its own (the usual arrival, read by the fast path).
    whole_events = [part + b"\n\n" for part in stream.split(b"\n\n")[:-1]]
    rest = stream[sum(map(len, whole_events)) :]
    assert events_of_blocks([*whole_events, rest]) == expected
    assert events_of_blocks([stream[n : n + 1] for n in range(len(stream))]) == expected
    for cut in range(len(stream)):
        assert events_of_blocks([stream[:cut], stream[cut:]]) == expected, cut
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(stream)), k=min(4, len(stream))))
        blocks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert events_of_blocks(blocks) == expected, cuts


def test_a_line_over_the_limit_is_refused_however_it_arrives() -> None:
    at_limit = b"data: " + b"x" * 4  # ten bytes
    assert events_of_blocks([at_limit + b"\n\n"], limit=10) == [b"xxxx"]
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        events_of_blocks([at_limit + b"y\n\n"], limit=10)  # whole, in one block
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        events_of_blocks([at_limit, b"y"], limit=10)  # never ended, in pieces
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        events_of_blocks([b"data: x\n\n" + at_limit + b"y"], limit=10)  # after an event


def typed_events(stream: bytes, kinds: tuple[bytes, ...]) -> list[bytes]:
    for blocks in ([stream], [stream[n : n + 1] for n in range(len(stream))]):
        reader = SSEReader(1 << 20, kinds=kinds)
        found = [event for block in blocks for event in reader.feed(block)] + reader.end()
        assert found == typed_events_once(stream, kinds)
    return typed_events_once(stream, kinds)


def typed_events_once(stream: bytes, kinds: tuple[bytes, ...]) -> list[bytes]:
    reader = SSEReader(1 << 20, kinds=kinds)
    return reader.feed(stream) + reader.end()


def test_only_the_events_of_the_types_asked_for_are_read() -> None:
    stream = (
        b'data: {"a": 1}\n\n'
        b"event: endpoint\ndata: /messages\n\n"
        b'event: message\ndata: {"b": 2}\n\n'
        b": keep-alive\n\n"
        b'data: {"c": 3}\n\n'
    )
    assert typed_events(stream, (b"message",)) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    assert typed_events(stream, (b"endpoint",)) == [b"/messages"]
    # An event's type ends with it: the next event without one is a message again.
    assert typed_events(b"event: x\n\ndata: 1\n\n", (b"message",)) == [b"1"]
    # The fast path (one whole event in a block) honours the filter too.
    assert SSEReader(100, kinds=(b"other",)).feed(b"data: 1\n\n") == []
