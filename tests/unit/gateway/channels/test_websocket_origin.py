"""Which pages may open a chat socket: cross-site WebSocket hijacking is refused."""

from __future__ import annotations

import pytest

from dexorder.gateway.channels.websocket import origin_allowed

ALLOWED = ["https://app.example.com"]


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "chat.example.com", True),  # not a browser: the token is the only key
        ("https://chat.example.com", "chat.example.com", True),  # the gateway's own page
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://app.example.com", "chat.example.com", True),  # configured
        ("https://evil.example", "chat.example.com", False),
        ("https://chat.example.com.evil.example", "chat.example.com", False),
        ("https://app.example.com:444", "chat.example.com", False),
        ("null", "chat.example.com", False),  # a sandboxed or file: page
        ("javascript://chat.example.com", "chat.example.com", False),
    ],
)
def test_origin_allowed(origin: str | None, host: str, allowed: bool) -> None:
    assert origin_allowed(origin, host, ALLOWED) is allowed
