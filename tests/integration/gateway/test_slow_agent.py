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
from tests.integration.gateway.conftest import (
    conversation_of,
    gateway_settings,
    open_chat,
    reply_text,
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
            first, first_id = await open_chat(http, gateway, issuer, user_id)
            first_conversation = conversation_of(gateway, first_id)
            llm.queue(TextScript(text="First."))
            await first.send({"type": "message", "content": "hello"})
            assert reply_text(await first.until("done")) == "First."
            agent = first_conversation.agent.session
            assert agent is not None
            assert agent.sessions_opened == 1

            # The agent is busy: the second chat's reads of it (ahead, then the turn's own)
            # take longer than the gateway waits.
            delay["seconds"] = 3.0
            second, second_id = await open_chat(http, gateway, issuer, user_id)
            second_conversation = conversation_of(gateway, second_id)
            await second.send({"type": "message", "content": "are you there?"})
            error = (await second.until("error", timeout=30))[-1]
            assert error["code"] == "agent_unavailable"
            assert "did not answer in 1 s" in error["message"]

            # The first chat's session was not dropped with the second chat's turn.
            assert not agent.closed
            assert first_conversation.agent.session is agent
            assert second_conversation.agent.session is agent

            # Once the agent answers again, both chats go on, on that same session.
            delay["seconds"] = 0.0
            llm.queue(TextScript(text="Still here."))
            await first.send({"type": "message", "content": "and now?"})
            assert reply_text(await first.until("done")) == "Still here."
            llm.queue(TextScript(text="Back."))
            await second.send({"type": "message", "content": "and you?"})
            assert reply_text(await second.until("done")) == "Back."
            assert first_conversation.agent.session is agent
            assert agent.sessions_opened == 1
            await first.ws.close()
            await second.ws.close()
