"""An agent that is slow to answer a read: the turn fails with ``agent_unavailable``, and
the MCP session the user's other chats share with it stays open."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from mcp.server.fastmcp import FastMCP

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.conversation import Conversation
from dexorder.gateway.state import LIVE_SOCKETS
from tests.integration.gateway.conftest import (
    ChatClient,
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
    serving,
)


def slow_agent(delay: dict[str, float]) -> FastMCP[Any]:
    """The resources and tool the harness uses, with a preferences read that takes
    ``delay["seconds"]`` (a user's own MCP server, busy)."""
    server: FastMCP[Any] = FastMCP("slow", json_response=True, log_level="WARNING")

    @server.resource("dexorder://preferences")
    async def preferences() -> str:
        await asyncio.sleep(delay["seconds"])
        return "{}"

    @server.resource("dexorder://history/{session_id}")
    def history(session_id: str) -> str:
        return "[]"

    @server.tool()
    def append_turns(session_id: str, turns: list[dict[str, Any]]) -> str:
        return f"recorded {len(turns)} turns of {session_id}"

    return server


async def open_chat(
    http: aiohttp.ClientSession, gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> tuple[ChatClient, Conversation]:
    client = await connect(http, gateway, issuer.mint(user_id))
    session_id = (await client.until("ready"))[-1]["session_id"]
    conversation = next(c for c in gateway.app[LIVE_SOCKETS].values() if c.session_id == session_id)
    return client, conversation


async def reply(client: ChatClient, content: str) -> str:
    await client.send({"type": "message", "content": content})
    frames = await client.until("done", timeout=60)
    return "".join(f["content"] for f in frames if f["type"] == "delta")


async def test_a_read_that_times_out_fails_the_turn_and_keeps_the_shared_session(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    delay = {"seconds": 0.0}
    async with serving(slow_agent(delay)) as url:
        async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
            await db.execute(
                "INSERT INTO user_licenses (user_id, license_type, mcp_server_url) "
                "VALUES (%s, 'pro', %s)",
                (user_id, url),
            )
        settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, agent_read_seconds=1)
        async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as http:
            first, first_conversation = await open_chat(http, gateway, issuer, user_id)
            llm.queue(TextScript(text="First."))
            assert await reply(first, "hello") == "First."
            agent = first_conversation.agent
            assert agent is not None
            assert agent.sessions_opened == 1

            # The agent is busy: the second chat's reads of it (ahead, then the turn's own)
            # take longer than the gateway waits.
            delay["seconds"] = 3.0
            second, second_conversation = await open_chat(http, gateway, issuer, user_id)
            await second.send({"type": "message", "content": "are you there?"})
            error = (await second.until("error", timeout=30))[-1]
            assert error["code"] == "agent_unavailable"
            assert "did not answer in 1 s" in error["message"]

            # The first chat's session was not dropped with the second chat's turn.
            assert not agent.closed
            assert first_conversation.agent is agent
            assert second_conversation.agent is agent

            # Once the agent answers again, both chats go on, on that same session.
            delay["seconds"] = 0.0
            llm.queue(TextScript(text="Still here."))
            assert await reply(first, "and now?") == "Still here."
            llm.queue(TextScript(text="Back."))
            assert await reply(second, "and you?") == "Back."
            assert first_conversation.agent is agent
            assert agent.sessions_opened == 1
            await first.ws.close()
            await second.ws.close()
