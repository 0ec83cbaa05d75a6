"""Which updates skip the queue: ``/stop``, however it is written, and nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from dexorder.gateway.channels.telegram.urgent import urgent_command


def message(text: Any) -> dict[str, Any]:
    return {"update_id": 1, "message": {"text": text}}


@pytest.mark.parametrize("text", ["/stop", "/STOP", "/stop@dexorder_bot", "/stop now"])
def test_stop_is_urgent(text: str) -> None:
    assert urgent_command(message(text)) == "stop"


@pytest.mark.parametrize("text", ["stop", "/stopper", "/new", "/", "/ ", "/\n", "", None, 3])
def test_anything_else_is_not(text: Any) -> None:
    assert urgent_command(message(text)) is None


def test_an_update_without_a_message_is_not() -> None:
    assert urgent_command({"update_id": 1, "callback_query": {"data": "/stop"}}) is None
    assert urgent_command({"update_id": 1, "message": "odd"}) is None
