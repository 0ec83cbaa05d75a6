"""Turns recorded as events: the user message, tool calls, the reply and the usage."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncGenerator, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest

from dexorder.gateway.events import JsonlSink
from dexorder.gateway.llm.pricing import litellm_cost
from dexorder.gateway.metrics import REGISTRY
from dexorder.gateway.pure.events import (
    AssistantReplyEvent,
    Event,
    ToolCallEvent,
    TurnOutcome,
    UsageEvent,
    UserMessageEvent,
    event_from_json,
)
from dexorder.gateway.stores.usage import (
    DailyIncrement,
    Turn,
    UsageRecorder,
    UsageStore,
    UsageUnavailable,
)
from dexorder.gateway.turn_runner import relay_turn
from dexorder.gateway.turns import ReplyDelta, ToolFinished, ToolStarted, TurnEvent, TurnTally


def fixed_cost(model: str, prompt: int, completion: int) -> float | None:
    return None if model == "unknown" else prompt * 0.001 + completion * 0.002


def recorded(sink: JsonlSink) -> list[Event]:
    path = sink.path_for(dt.datetime.now(dt.UTC).date())
    return [event_from_json(line) for line in path.read_bytes().splitlines()]


async def see_all(turn: Turn, tally: TurnTally, events: Iterable[TurnEvent]) -> None:
    """What the turn runner does with each event, before the channel gets it."""
    for event in events:
        tally.see(event)
        recorded = turn.see(event)
        if recorded is not None:
            await recorded


async def test_a_turn_records_its_message_tool_calls_reply_and_usage(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    recorder = UsageRecorder(sink, None, cost=fixed_cost)
    turn = await recorder.start_turn(
        user_id="u1", tier="pro", channel="telegram", session_id="s1", text="price of ETH?"
    )
    tally = TurnTally()
    await see_all(
        turn,
        tally,
        [
            ToolStarted("c1", "get_price", {"symbol": "ETH"}),
            ToolFinished("c1", "3000", is_error=False),
            ReplyDelta("ETH is "),
            ReplyDelta("3000."),
        ],
    )
    usage = await turn.finish(model="gpt-4o", prompt_tokens=100, completion_tokens=20, tally=tally)
    assert await turn.finish(model="gpt-4o", prompt_tokens=1, completion_tokens=1) is None
    await recorder.close()

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
    turn = await recorder.start_turn(
        user_id="u1", tier="free", channel="websocket", session_id="s1", text="go"
    )
    tally = TurnTally()
    await see_all(turn, tally, [ToolStarted("c9", "slow", {})])
    usage = await turn.finish(
        model="unknown",
        prompt_tokens=0,
        completion_tokens=0,
        outcome=TurnOutcome.CANCELLED,
        tally=tally,
    )
    await recorder.close()

    assert usage is not None
    assert usage.cost_usd is None
    assert usage.first_token_ms is None
    assert usage.tool_calls == 1
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


def test_seeing_makes_no_coroutine_but_for_a_finished_tool_call(tmp_path: Path) -> None:
    turn = Turn(UsageRecorder(JsonlSink(tmp_path), None), **WHO)
    assert turn.see(ReplyDelta("a")) is None
    assert turn.see(ToolStarted("c1", "t", {})) is None
    assert turn.see(ToolFinished("nobody", "", is_error=False)) is None
    publishing = turn.see(ToolFinished("c1", "", is_error=False))
    assert isinstance(publishing, Coroutine)
    publishing.close()


def test_the_tally_counts_the_reply_its_first_token_and_the_tools() -> None:
    tally = TurnTally()
    assert (tally.reply, tally.first_token_at, tally.tool_calls) == ("", None, 0)
    for event in (ToolStarted("c1", "t", {}), ToolFinished("c1", "x", False), ReplyDelta("a")):
        tally.see(event)
    first = tally.first_token_at
    tally.see(ReplyDelta("b"))
    assert (tally.reply, tally.tool_calls) == ("ab", 1)
    assert first is not None
    assert tally.first_token_at == first


async def test_a_tool_call_is_recorded_before_its_result_goes_on(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    recorder = UsageRecorder(sink, None, cost=fixed_cost)
    recorded_when_shown: list[list[type[Event]]] = []

    async def show(event: TurnEvent) -> None:
        path = sink.path_for(dt.datetime.now(dt.UTC).date())
        recorded_when_shown.append([type(e) for e in recorded(sink)] if path.exists() else [])

    async def events() -> AsyncGenerator[TurnEvent, None]:
        yield ToolStarted("c1", "get_price", {})
        yield ToolFinished("c1", "3000", is_error=False)

    turn = await recorder.start_turn(text="go", **WHO)
    assert await relay_turn(events(), tally=TurnTally(), usage=turn, show=show) is None
    await recorder.close()
    assert recorded_when_shown == [[UserMessageEvent], [UserMessageEvent, ToolCallEvent]]


# --- the daily totals: one writer, what turns add meanwhile summed into its next write ---


WHO = {"user_id": "u1", "tier": "pro", "channel": "websocket", "session_id": "s1"}


class HeldStore(UsageStore):
    """A store whose writes wait to be let go, and say what they carried (no database: what
    is tested here is the recorder's bookkeeping)."""

    def __init__(self, *, failing: bool = False) -> None:
        self.writes: list[list[DailyIncrement]] = []
        self.let_go = asyncio.Event()
        self.failing = failing

    async def add_many(self, increments: Iterable[DailyIncrement]) -> None:
        self.writes.append(list(increments))
        await self.let_go.wait()
        if self.failing:
            raise UsageUnavailable("the database is down")


def not_recorded_daily() -> float:
    value = REGISTRY.get_sample_value(
        "dexorder_gateway_usage_not_recorded_total", {"where": "daily"}
    )
    return value or 0.0


def daily_writers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "usage:daily" and not t.done()]


async def finish(recorder: UsageRecorder, user_id: str, prompt_tokens: int) -> str:
    turn = await recorder.start_turn(text="hi", **{**WHO, "user_id": user_id})
    await turn.finish(model="m", prompt_tokens=prompt_tokens, completion_tokens=1)
    return turn.turn_id


async def test_turns_that_end_during_a_write_share_the_next_one(tmp_path: Path) -> None:
    store = HeldStore()
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=fixed_cost)
    today = dt.datetime.now(dt.UTC).date()
    await finish(recorder, "a", 10)
    await asyncio.sleep(0)  # the writer takes it
    assert store.writes == [[DailyIncrement("a", today, 10, 1, 1)]]
    await asyncio.gather(
        finish(recorder, "a", 1), finish(recorder, "b", 2), finish(recorder, "a", 4)
    )
    await asyncio.sleep(0)
    assert len(store.writes) == 1  # still one in flight
    store.let_go.set()
    await recorder.close()
    assert len(store.writes) == 2
    assert sorted(store.writes[1], key=lambda i: i.user_id) == [
        DailyIncrement("a", today, 5, 2, 2),
        DailyIncrement("b", today, 2, 1, 1),
    ]
    assert daily_writers() == []


async def test_a_failed_write_counts_and_logs_every_turn_it_carried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = HeldStore(failing=True)
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=fixed_cost)
    before = not_recorded_daily()
    turns = [await finish(recorder, "a", 1)]
    await asyncio.sleep(0)
    turns += await asyncio.gather(finish(recorder, "a", 2), finish(recorder, "b", 3))
    store.let_go.set()
    with caplog.at_level(logging.ERROR, logger="dexorder.gateway.stores.usage"):
        await recorder.close()
    assert len(store.writes) == 2
    assert not_recorded_daily() == before + 3
    for turn_id in turns:
        assert any(turn_id in record.getMessage() for record in caplog.records)
    assert daily_writers() == []


async def test_past_the_timeout_every_unwritten_turn_is_counted_and_no_task_is_left(
    tmp_path: Path,
) -> None:
    store = HeldStore()  # never lets go
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=fixed_cost)
    before = not_recorded_daily()
    await finish(recorder, "a", 1)
    await asyncio.sleep(0)  # one in flight ...
    await asyncio.gather(finish(recorder, "a", 1), finish(recorder, "b", 1))  # ... two pending
    await recorder.close(timeout=0.05)
    assert not_recorded_daily() == before + 3
    assert daily_writers() == []
    await finish(recorder, "c", 1)  # after close: counted, and no writer started
    await recorder.sink.close()  # (its events reopened the sink)
    assert not_recorded_daily() == before + 4
    assert daily_writers() == []
    assert len(store.writes) == 1


async def test_a_writer_cancelled_before_it_began_loses_no_turn_unseen(tmp_path: Path) -> None:
    store = HeldStore()
    store.let_go.set()
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=fixed_cost)
    before = not_recorded_daily()
    await finish(recorder, "a", 1)  # its writer is created, and has not run yet
    for writer in daily_writers():
        writer.cancel()  # as a loop's shutdown would
    await asyncio.sleep(0)
    await finish(recorder, "a", 2)  # a new writer carries both
    await recorder.drain()
    assert store.writes == [[DailyIncrement("a", dt.datetime.now(dt.UTC).date(), 3, 2, 2)]]
    assert not_recorded_daily() == before

    await finish(recorder, "b", 1)
    for writer in daily_writers():
        writer.cancel()
    await recorder.close()  # nothing would write it now: counted
    assert not_recorded_daily() == before + 1
    assert daily_writers() == []
    assert len(store.writes) == 1


def test_a_row_the_table_would_refuse_is_found_first() -> None:
    day = dt.date(2026, 11, 24)
    assert DailyIncrement("u", day, 1, 2, 3).refusal() is None
    assert DailyIncrement("", day, 1, 2, 3).refusal() == "not a user id: ''"
    assert DailyIncrement("u\x00", day, 1, 2, 3).refusal() is not None
    assert DailyIncrement("u", day, -1, 2, 3).refusal() == "usage increments must not be negative"
    assert DailyIncrement("u", day, 1, 2, -3).refusal() is not None


async def test_turns_that_end_within_the_batch_window_share_one_write(tmp_path: Path) -> None:
    store = HeldStore()
    store.let_go.set()
    recorder = UsageRecorder(JsonlSink(tmp_path), store, cost=fixed_cost, daily_batch_seconds=0.2)
    today = dt.datetime.now(dt.UTC).date()
    try:
        await finish(recorder, "a", 10)
        await asyncio.sleep(0.05)
        assert store.writes == []  # still gathering
        await finish(recorder, "a", 5)
        await finish(recorder, "b", 1)
        await recorder.drain()
    finally:
        await recorder.close()
    assert store.writes == [
        [DailyIncrement("a", today, 15, 2, 2), DailyIncrement("b", today, 1, 1, 1)]
    ]
