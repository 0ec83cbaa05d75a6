"""What an agent answers when it fails is for the log, not the user (issue 21, item 12): a
tool call that the agent answers with an HTTP error shows a generic message with a
reference, and the log has the agent's body under that reference."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import uvicorn
from mcp.server.fastmcp import FastMCP
from starlette.types import Message, Receive, Scope, Send

from dexorder.devenv.fake_llm import FakeLLMServer, ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import free_port
from tests.integration.gateway.conftest import connect, gateway_settings, serve_gateway

AGENT_BODY = "Traceback (most recent call last): /srv/agent/store.py line 7: db locked"


def failing_agent() -> FastMCP[Any]:
    server: FastMCP[Any] = FastMCP("failing", json_response=True, log_level="WARNING")

    @server.resource("dexorder://preferences")
    def preferences() -> str:
        return "{}"

    @server.resource("dexorder://history/{session_id}")
    def history(session_id: str) -> str:
        return "[]"

    @server.tool()
    def recall(query: str) -> str:
        raise AssertionError("answered with HTTP 500 before it gets here")

    @server.tool()
    def append_turns(session_id: str, turns: list[dict[str, Any]]) -> str:
        return "recorded"

    return server


@contextlib.asynccontextmanager
async def serving_with_failing_recall(server: FastMCP[Any]) -> AsyncIterator[str]:
    """The server, except that a call of ``recall`` is answered 500 with ``AGENT_BODY``."""
    inner = server.streamable_http_app()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await inner(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if b'"tools/call"' in body and b'"recall"' in body:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": AGENT_BODY.encode()})
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await inner(scope, replay, send)

    port = free_port()
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(runner.serve())
    try:
        async with asyncio.timeout(30):
            while not runner.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        runner.should_exit = True
        await task


async def test_an_agents_error_body_reaches_the_log_not_the_user(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving_with_failing_recall(failing_agent()) as url:
        async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
            await db.execute(
                "INSERT INTO user_licenses (user_id, license_type, mcp_server_url) "
                "VALUES (%s, 'pro', %s)",
                (user_id, url),
            )
        settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path)
        async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as http:
            llm.queue(ToolScript(name="recall", arguments={"query": "ETH"}))
            client = await connect(http, gateway, issuer.mint(user_id))
            await client.until("ready")
            with caplog.at_level(logging.WARNING, logger="dexorder.gateway.harness"):
                await client.send({"type": "message", "content": "what do you remember?"})
                frames = await client.until("done", timeout=120)
            await client.ws.close()
    result = next(f for f in frames if f["type"] == "tool_result")
    assert result["is_error"]
    assert "your agent could not run recall right now (reference " in result["content"]
    assert "Traceback" not in result["content"]
    assert "/srv/agent" not in result["content"]
    reference = result["content"].rsplit("reference ", 1)[1].rstrip(")")
    logged = [r.getMessage() for r in caplog.records if reference in r.getMessage()]
    assert any(AGENT_BODY in line for line in logged), logged
    # Nor does the model read the agent's body.
    assert AGENT_BODY not in str(llm.requests[-1].body["messages"])
