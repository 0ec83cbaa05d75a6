"""Small input checks of the agent (issue 21, item 14): whole-string validation, and log
lines a sender cannot forge."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import pytest

from dexorder.agent.auth import BearerAuth
from dexorder.agent.errors import InvalidInput
from dexorder.agent.validation import check_name, check_session_id


@pytest.mark.parametrize("session_id", ["chat-1\n", "chat-1\nforged", "\nchat"])
def test_a_session_id_with_a_newline_is_refused(session_id: str) -> None:
    with pytest.raises(InvalidInput, match="session_id must be"):
        check_session_id(session_id)


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidInput):
        check_name("trend\n", "strategy")
    check_name("trend", "strategy")


async def test_a_refused_path_is_logged_quoted(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached without the token")

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mcp\n2026-12-07 INFO forged line",
        "headers": [],
        "client": ("127.0.0.1", 1),
    }
    with caplog.at_level(logging.WARNING, logger="dexorder.agent.auth"):
        await BearerAuth(app, "t" * 32)(scope, receive, send)
    assert sent[0]["status"] == 401
    [record] = caplog.records
    assert "\n" not in record.getMessage()
    assert "'/mcp\\n2026-12-07 INFO forged line'" in record.getMessage()
