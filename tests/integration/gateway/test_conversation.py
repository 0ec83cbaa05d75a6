"""Conversations through a real gateway: the user's chats share one MCP session with the
agent, and each turn's context is read ahead, after the previous turn's write-back."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway import metrics
from dexorder.gateway.agents.provisioning.local import LocalProvisioner
from dexorder.gateway.state import CHAT_SERVICES, SESSIONS
from tests.integration.gateway.conftest import (
    RunningGateway,
    conversation_of,
    open_chat,
    reply_text,
)

T = TypeVar("T")

# Every task a conversation may start, directly or through the shared MCP session.
CHAT_TASKS = ("conversation:", "turn:", "read-ahead:", "mcp-linger:")


async def eventually(check: Callable[[], T | None], timeout: float = 15) -> T:
    """The first truthy value of ``check``, polled until ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if value:
                return value
            await asyncio.sleep(0.02)


def chat_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith(CHAT_TASKS)}


async def test_two_chats_of_one_user_share_one_mcp_session(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    before = chat_tasks()
    pool = gateway.app[CHAT_SERVICES].agents.sessions
    store = gateway.app[SESSIONS]
    async with aiohttp.ClientSession() as http:
        first, first_id = await open_chat(http, gateway, issuer, user_id)
        second, second_id = await open_chat(http, gateway, issuer, user_id)
        # One after the other: the free tier has one generation at a time. The model
        # answers with its offline script, a tool call to the agent and then text.
        for client in (first, second):
            await client.send({"type": "message", "content": "hello from this tab"})
            frames = await client.until("done", timeout=90)
            assert next(f for f in frames if f["type"] == "tool_result")["is_error"] is False

        agent = conversation_of(gateway, first_id).agent.session
        assert agent is not None
        assert conversation_of(gateway, second_id).agent.session is agent
        assert agent.sessions_opened == 1
        assert pool.sessions_of(user_id) == [agent]
        assert pool.holders(agent) == 2
        # Each chat session records the MCP session it uses: the same one.
        for session_id in (first_id, second_id):
            state = await store.claim(session_id, user_id=user_id, channel="websocket")
            assert state.mcp_session_id is not None
            assert state.mcp_session_id == agent.mcp_session_id

        # Closing one chat leaves the session to the other.
        await first.ws.close()
        await eventually(lambda: pool.holders(agent) == 1)
        llm.queue(TextScript(text="Still here."))
        await second.send({"type": "message", "content": "are you there?"})
        assert reply_text(await second.until("done")) == "Still here."
        assert not agent.closed
        assert agent.sessions_opened == 1
        await second.ws.close()

    # The last one closing closes the session (after its linger), and nothing is left running.
    await eventually(lambda: agent.closed)
    assert pool.sessions_of(user_id) == []
    await eventually(lambda: not (chat_tasks() - before))


async def test_the_next_turn_takes_its_context_from_the_read_after_the_write_back(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    provisioner = gateway.app[CHAT_SERVICES].agents.provisioner
    assert isinstance(provisioner, LocalProvisioner)
    llm.queue(
        ToolScript(name="set_preference", arguments={"key": "risk_profile", "value": "aggressive"})
    )
    async with aiohttp.ClientSession() as http:
        client, session_id = await open_chat(http, gateway, issuer, user_id)
        conversation = conversation_of(gateway, session_id)
        await client.send({"type": "message", "content": "I can take some risk"})
        frames = await client.until("done", timeout=90)
        assert next(f for f in frames if f["type"] == "tool_result")["is_error"] is False

        # Read after the turn was written back: the tool's preference and the turn are in.
        context = await eventually(lambda: conversation.agent.context_read_ahead)
        assert context.preferences["risk_profile"] == "aggressive"
        assert "I can take some risk" in [turn.get("content") for turn in context.turns]

        # With the agent stopped, the next prompt can only come from what was read ahead.
        first_agent = conversation.agent.session
        assert first_agent is not None
        await provisioner.stop_agent(user_id)
        llm.queue(TextScript(text="Noted."))
        await client.send({"type": "message", "content": "what now?"})
        frames = await client.until("done", timeout=60)
        assert reply_text(frames) == "Noted."
        messages = llm.requests[-1].body["messages"]
        assert "risk_profile: aggressive" in messages[0]["content"]
        assert "I can take some risk" in [m.get("content") for m in messages]

        # That turn's write-back and the read ahead after it failed. The next turn reads
        # for itself, finds the agent gone, and gets it started again, as without read ahead.
        sources_before = turn_context_sources()
        llm.queue(TextScript(text="Back again."))
        await client.send({"type": "message", "content": "still there?"})
        frames = await client.until("done", timeout=90)
        assert not [f for f in frames if f["type"] == "error"]
        assert set(turn_context_sources() - sources_before) == {"read"}
        assert "waking" in [f["stage"] for f in frames if f["type"] == "status"]
        assert reply_text(frames) == "Back again."
        assert first_agent.closed
        assert conversation.agent.session not in (None, first_agent)
        messages = llm.requests[-1].body["messages"]
        assert "risk_profile: aggressive" in messages[0]["content"]  # kept by the agent
        assert "I can take some risk" in [m.get("content") for m in messages]
        await client.ws.close()


def turn_context_sources() -> Counter[str]:
    """The turn-context counter's values, by source."""
    return Counter(
        {
            source: metrics.REGISTRY.get_sample_value(
                "dexorder_gateway_turn_contexts_total", {"source": source}
            )
            or 0.0
            for source in ("carried", "read_ahead", "read")
        }
    )


async def test_a_turn_without_tools_hands_its_context_on_without_reading(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as http:
        client, session_id = await open_chat(http, gateway, issuer, user_id)
        conversation = conversation_of(gateway, session_id)
        sources_before = turn_context_sources()

        # The agent is made for the first message, and its context read ahead of the turn.
        llm.queue(TextScript(text="Plain answer."))
        await client.send({"type": "message", "content": "just talk"})
        assert reply_text(await client.until("done")) == "Plain answer."
        assert turn_context_sources() - sources_before == Counter(read_ahead=1)
        # No tool ran: the next context is the first read plus this turn, not a new read
        # (the read time is the first read's, so it goes stale as that read does).
        carried = await eventually(lambda: conversation.agent.context_read_ahead)
        assert carried.carried
        first = carried
        assert [t["content"] for t in carried.turns[-2:]] == ["just talk", "Plain answer."]

        # And the model sees exactly what the agent holds: the next prompt has that turn.
        llm.queue(TextScript(text="Second answer."))
        await client.send({"type": "message", "content": "and again"})
        assert reply_text(await client.until("done")) == "Second answer."
        contents = [m.get("content") for m in llm.requests[-1].body["messages"]]
        assert contents[-3:] == ["just talk", "Plain answer.", "and again"]
        assert turn_context_sources() - sources_before == Counter(read_ahead=1, carried=1)

        # A turn that runs a tool is followed by a fresh read.
        llm.queue(ToolScript(name="get_preferences"))
        await client.send({"type": "message", "content": "what do I prefer?"})
        await client.until("done", timeout=60)
        reread = await eventually(lambda: conversation.agent.context_read_ahead)
        assert reread.read_at > first.read_at
        await client.ws.close()
