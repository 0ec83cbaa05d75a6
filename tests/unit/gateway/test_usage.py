"""Turns recorded as events: the user message, tool calls, the reply and the usage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from dexorder.core import protocol
from dexorder.core.events import (
    AssistantReplyEvent,
    Event,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    event_from_json,
)
from dexorder.gateway.events import JsonlSink
from dexorder.gateway.usage import UsageRecorder, litellm_cost


def fixed_cost(model: str, prompt: int, completion: int) -> float | None:
    return None if model == "unknown" else prompt * 0.001 + completion * 0.002


def recorded(sink: JsonlSink) -> list[Event]:
    path = sink.path_for(dt.datetime.now(dt.UTC).date())
    return [event_from_json(line) for line in path.read_bytes().splitlines()]


async def test_a_turn_records_its_message_tool_calls_reply_and_usage(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    recorder = UsageRecorder(sink, None, cost=fixed_cost)
    shown: list[protocol.Frame] = []

    async def emit(frame: protocol.Frame) -> None:
        shown.append(frame)

    turn = await recorder.start_turn(
        user_id="u1", tier="pro", channel="telegram", session_id="s1", text="price of ETH?"
    )
    observed = turn.observe(emit)
    frames: list[protocol.Frame] = [
        protocol.ToolCallFrame(id="c1", name="get_price", arguments={"symbol": "ETH"}),
        protocol.ToolResultFrame(id="c1", content="3000", is_error=False),
        protocol.DeltaFrame(content="ETH is "),
        protocol.DeltaFrame(content="3000."),
    ]
    for frame in frames:
        await observed(frame)
    usage = await turn.finish(model="gpt-4o", prompt_tokens=100, completion_tokens=20)
    assert await turn.finish(model="gpt-4o", prompt_tokens=1, completion_tokens=1) is None
    await recorder.close()

    assert shown == frames  # observing passes every frame on unchanged
    events = recorded(sink)
    assert [type(e) for e in events] == [
        UserMessageEvent,
        ToolCallEvent,
        AssistantReplyEvent,
        UsageEvent,
    ]
    assert {e.turn_id for e in events} == {turn.turn_id}
    assert len({e.event_id for e in events}) == 4
    message, call, reply, last = events
    assert isinstance(message, UserMessageEvent)
    assert message.content == "price of ETH?"
    assert isinstance(call, ToolCallEvent)
    assert (call.name, call.arguments, call.result, call.is_error) == (
        "get_price",
        {"symbol": "ETH"},
        "3000",
        False,
    )
    assert isinstance(reply, AssistantReplyEvent)
    assert reply.content == "ETH is 3000."
    assert last == usage
    assert isinstance(last, UsageEvent)
    assert (last.user_id, last.tier, last.channel, last.model) == (
        "u1",
        "pro",
        "telegram",
        "gpt-4o",
    )
    assert (last.prompt_tokens, last.completion_tokens, last.tool_calls) == (100, 20, 1)
    assert last.cost_usd == 100 * 0.001 + 20 * 0.002
    assert last.first_token_ms is not None
    assert last.latency_ms >= last.first_token_ms


async def test_a_cancelled_turn_records_the_unanswered_tool_call(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    recorder = UsageRecorder(sink, None, cost=fixed_cost)

    async def emit(frame: protocol.Frame) -> None:
        return None

    turn = await recorder.start_turn(
        user_id="u1", tier="free", channel="websocket", session_id="s1", text="go"
    )
    await turn.observe(emit)(protocol.ToolCallFrame(id="c9", name="slow", arguments={}))
    usage = await turn.finish(
        model="unknown", prompt_tokens=0, completion_tokens=0, outcome=TurnOutcome.CANCELLED
    )
    await recorder.close()

    assert usage is not None
    assert usage.cost_usd is None
    assert usage.first_token_ms is None
    call = [e for e in recorded(sink) if isinstance(e, ToolCallEvent)]
    assert len(call) == 1
    assert call[0].result is None
    assert call[0].is_error is None
    assert usage.outcome is TurnOutcome.CANCELLED


def test_litellm_prices_models_it_knows_and_not_others() -> None:
    cost = litellm_cost("gpt-4o", 1000, 1000)
    assert cost is not None
    assert cost > 0
    assert litellm_cost("openai/no-such-model-anywhere", 1000, 1000) is None
    assert litellm_cost("", 1, 1) is None
