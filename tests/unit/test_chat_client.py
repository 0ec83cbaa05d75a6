"""The terminal client's pure parts: frames as text, URLs, and reading lines from a pipe."""

from __future__ import annotations

import asyncio
import os

import pytest

from dexorder.chat_client import ChatClientError, LineReader, ends_turn, http_url, render, ws_url


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        ({"type": "delta", "content": "Hel"}, "Hel"),
        (
            {"type": "status", "stage": "waking", "message": "waking your agent"},
            "[waking] waking your agent\n",
        ),
        (
            {"type": "ready", "user": "alice", "tier": "pro", "session_id": "s1"},
            "connected as alice (pro), session s1\n",
        ),
        (
            {"type": "tool_call", "id": "c1", "name": "recall", "arguments": {"q": "eth"}},
            '\n→ recall({"q": "eth"})\n',
        ),
        (
            {"type": "tool_result", "id": "c1", "content": "boom", "is_error": True},
            "← error: boom\n",
        ),
        (
            {"type": "done", "usage": {"total_tokens": 12}, "model": "m", "cancelled": True},
            "\n[done (cancelled): 12 tokens, m]\n",
        ),
        ({"type": "error", "code": "llm_error", "message": "down"}, "\n[error llm_error] down\n"),
        (
            {"type": "approval_result", "request_id": "r", "decision": "approved", "message": "ok"},
            "\n[approved] ok\n",
        ),
        ({"type": "pong"}, ""),
    ],
)
def test_render(frame: dict[str, object], text: str) -> None:
    assert render(frame) == text


def test_long_tool_results_are_cut() -> None:
    shown = render({"type": "tool_result", "id": "c", "content": "x" * 1000})
    assert shown == "← " + "x" * 300 + "…\n"


def test_a_turn_ends_with_done_or_an_error_about_it() -> None:
    assert ends_turn({"type": "done"})
    assert ends_turn({"type": "error", "code": "rate_limited"})
    assert not ends_turn({"type": "error", "code": "bad_request"})
    assert not ends_turn({"type": "delta", "content": "x"})


@pytest.mark.parametrize(
    ("given", "socket", "http"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/chat", "http://127.0.0.1:8080"),
        ("https://chat.example/", "wss://chat.example/ws/chat", "https://chat.example"),
        ("ws://h:1/ws/chat", "ws://h:1/ws/chat", "http://h:1"),
        ("wss://h/ws/chat/", "wss://h/ws/chat", "https://h"),
    ],
)
def test_urls(given: str, socket: str, http: str) -> None:
    assert ws_url(given) == socket
    assert http_url(given) == http


def test_a_url_without_a_scheme_is_refused() -> None:
    with pytest.raises(ChatClientError, match="must start with"):
        ws_url("localhost:8080")


async def test_line_reader_splits_lines_and_reports_the_end() -> None:
    read_end, write_end = os.pipe()
    reader = LineReader(read_end)
    loop = asyncio.get_running_loop()
    reader.start(loop)
    try:
        os.write(write_end, b"first\nsecond ")
        assert await asyncio.wait_for(reader.lines.get(), 5) == "first"
        os.write(write_end, b"half\nlast without newline")
        assert await asyncio.wait_for(reader.lines.get(), 5) == "second half"
        os.close(write_end)
        assert await asyncio.wait_for(reader.lines.get(), 5) == "last without newline"
        assert await asyncio.wait_for(reader.lines.get(), 5) is None
    finally:
        reader.stop(loop)
        os.close(read_end)
