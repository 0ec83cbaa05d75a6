"""A turn's events: their frames, and the runner that fans them out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import pytest

from dexorder.gateway.agent_handle import CONTEXT_FRESH_SECONDS, fresh
from dexorder.gateway.agents.mcp_client import AgentSession, ToolSpec
from dexorder.gateway.agents.provisioning import AgentEndpoint
from dexorder.gateway.harness import carried_context, openai_tools
from dexorder.gateway.llm.adapter import Usage
from dexorder.gateway.pure import protocol
from dexorder.gateway.turn_runner import relay_turn
from dexorder.gateway.turns import (
    AgentContext,
    FellBack,
    ReplyDelta,
    SourcesCited,
    ToolFinished,
    ToolStarted,
    TurnEvent,
    TurnFinished,
    TurnTally,
    frame_for,
)


def test_each_event_has_its_frame() -> None:
    source = protocol.Source(source="doc.md", score=0.5)
    assert frame_for(ReplyDelta("hi")) == protocol.DeltaFrame(content="hi")
    assert frame_for(ToolStarted("c1", "t", {"a": 1})) == protocol.ToolCallFrame(
        id="c1", name="t", arguments={"a": 1}
    )
    assert frame_for(ToolFinished("c1", "x", is_error=True)) == protocol.ToolResultFrame(
        id="c1", content="x", is_error=True
    )
    assert frame_for(FellBack("b took over")) == protocol.StatusFrame(
        stage=protocol.Stage.RETRYING, message="b took over"
    )
    assert frame_for(SourcesCited((source,))) == protocol.SourcesFrame(items=[source])
    done = frame_for(TurnFinished(model="m", usage=Usage(3, 2, 5), route=None))
    assert done == protocol.DoneFrame(
        usage=protocol.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5), model="m"
    )
    cancelled = frame_for(TurnFinished(model="", usage=Usage(0, 0, 0), route=None, cancelled=True))
    assert isinstance(cancelled, protocol.DoneFrame)
    assert cancelled.cancelled


async def test_the_runner_returns_the_finish_and_shows_the_rest() -> None:
    finished = TurnFinished(model="m", usage=Usage(1, 1, 2), route=None)

    async def events() -> AsyncGenerator[TurnEvent, None]:
        yield ReplyDelta("a")
        yield ToolStarted("c1", "t", {})
        yield finished

    shown: list[TurnEvent] = []

    async def show(event: TurnEvent) -> None:
        shown.append(event)

    tally = TurnTally()
    assert await relay_turn(events(), tally=tally, usage=None, show=show) is finished
    assert shown == [ReplyDelta("a"), ToolStarted("c1", "t", {})]
    assert (tally.reply, tally.tool_calls) == ("a", 1)


async def test_a_cancel_in_the_channel_reaches_the_harness() -> None:
    """The harness records a cancelled turn: a cancel that comes while the channel shows
    an event is thrown in at the harness's ``yield``."""
    harness_saw: list[str] = []
    showing = asyncio.Event()

    async def events() -> AsyncGenerator[TurnEvent, None]:
        try:
            yield ReplyDelta("a")
            yield ReplyDelta("never")
        except asyncio.CancelledError:
            harness_saw.append("cancelled")
            raise

    async def show(event: TurnEvent) -> None:
        showing.set()
        await asyncio.Event().wait()  # a channel that is slow to take it

    task = asyncio.create_task(relay_turn(events(), tally=TurnTally(), usage=None, show=show))
    await showing.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert harness_saw == ["cancelled"]


def test_a_context_read_ahead_is_fresh_for_thirty_seconds() -> None:
    read = AgentContext({}, [], read_at=100.0)
    assert fresh(read, 100.0 + CONTEXT_FRESH_SECONDS)
    assert not fresh(read, 100.1 + CONTEXT_FRESH_SECONDS)
    assert not fresh(None, 100.0)


def test_a_turn_without_tools_carries_its_context_over() -> None:
    context = AgentContext({"style": "brief"}, [{"role": "user", "content": "a"}], read_at=5.0)
    record = [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    carried = carried_context(context, record)
    assert carried == AgentContext(
        {"style": "brief"}, [*context.turns, *record], read_at=5.0, carried=True
    )
    with_tool = [*record[:1], {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    assert carried_context(context, with_tool) is None


async def test_a_sessions_tools_are_encoded_once_for_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = AgentSession(AgentEndpoint("u", "http://127.0.0.1:9/mcp", None))
    listed = [ToolSpec("recall", "Search the memory.", {})]
    asked: list[int] = []

    async def list_tools() -> list[ToolSpec]:
        asked.append(1)
        return listed  # the session keeps its list: the same object every time

    monkeypatch.setattr(session, "list_tools", list_tools)
    first = await openai_tools(session)
    assert await openai_tools(session) is first
    assert len(asked) == 2
    assert json.loads(first.json)[0]["function"]["name"] == "recall"
    await session.close()


async def test_the_model_is_offered_only_the_allowed_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    session = AgentSession(AgentEndpoint("u", "http://127.0.0.1:9/mcp", None))
    listed = [
        ToolSpec(name, "", {})
        for name in ("recall", "approve_strategy", "append_turns", "added_later")
    ]

    async def list_tools() -> list[ToolSpec]:
        return listed

    monkeypatch.setattr(session, "list_tools", list_tools)
    offered = json.loads((await openai_tools(session)).json)
    assert [tool["function"]["name"] for tool in offered] == ["recall"]
    await session.close()
