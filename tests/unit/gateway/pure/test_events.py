"""Events and their JSON form: round trips, the discriminator, and refusals."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from dexorder.gateway.pure.events import (
    AssistantReplyEvent,
    EventFormatError,
    EventStream,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    event_from_json,
)

WHEN = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
COMMON = {
    "occurred_at": WHEN,
    "user_id": "user-1",
    "session_id": "s1",
    "turn_id": "t1",
    "channel": "websocket",
}


def usage(**overrides: object) -> UsageEvent:
    values: dict[str, object] = {
        **COMMON,
        "tier": "pro",
        "model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.001,
        "latency_ms": 120.5,
        **overrides,
    }
    return UsageEvent.model_validate(values)


def test_each_event_survives_its_json_form() -> None:
    events = [
        usage(),
        UserMessageEvent.model_validate({**COMMON, "content": "hello"}),
        AssistantReplyEvent.model_validate(
            {**COMMON, "content": "hi", "model": "m", "outcome": TurnOutcome.CANCELLED}
        ),
        ToolCallEvent.model_validate(
            {**COMMON, "call_id": "c1", "name": "get", "arguments": {"a": [1]}, "result": "ok"}
        ),
    ]
    for event in events:
        assert event_from_json(event.to_json()) == event


def test_the_json_names_its_type_version_and_id() -> None:
    event = usage()
    data = json.loads(event.to_json())
    assert data["type"] == "usage"
    assert data["schema_version"] == 1
    assert data["event_id"] == event.event_id
    assert len(event.event_id) == 32
    assert data["cost_usd"] == 0.001


def test_every_event_gets_its_own_id() -> None:
    assert usage().event_id != usage().event_id


def test_usage_goes_to_the_usage_stream_and_the_rest_to_conversations() -> None:
    assert usage().stream is EventStream.USAGE
    message = UserMessageEvent.model_validate({**COMMON, "content": "x"})
    assert message.stream is EventStream.CONVERSATION


def test_total_tokens_adds_prompt_and_completion() -> None:
    assert usage(prompt_tokens=7, completion_tokens=3).total_tokens == 10


def test_unknown_cost_is_none() -> None:
    parsed = event_from_json(usage(cost_usd=None).to_json())
    assert isinstance(parsed, UsageEvent)
    assert parsed.cost_usd is None


def test_bad_json_is_refused_with_the_field_named() -> None:
    data = json.loads(usage().to_json())
    data["prompt_tokens"] = -1
    with pytest.raises(EventFormatError, match="prompt_tokens"):
        event_from_json(json.dumps(data))


def test_an_unknown_type_is_refused() -> None:
    data = json.loads(usage().to_json())
    data["type"] = "mystery"
    with pytest.raises(EventFormatError):
        event_from_json(json.dumps(data))


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="occurred_at"):
        usage(occurred_at=dt.datetime(2026, 1, 1))
