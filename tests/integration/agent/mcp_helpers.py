"""The real MCP client, over streamable HTTP, pointed at a real agent process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent, TextResourceContents

from dexorder.devenv.agent import AgentProcess


@asynccontextmanager
async def connect(agent: AgentProcess, token: str | None = None) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token if token is not None else agent.token}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0)) as http,
        streamable_http_client(agent.url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed, and return its structured result."""
    result = await session.call_tool(tool, arguments)
    assert not result.isError, f"{tool} failed: {text_of(result)}"
    assert result.structuredContent is not None
    return result.structuredContent


async def call_error(session: ClientSession, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail, and return its error message."""
    result = await session.call_tool(tool, arguments)
    assert result.isError, f"{tool} succeeded unexpectedly: {text_of(result)}"
    return text_of(result)


async def read_json(session: ClientSession, uri: str) -> Any:
    result = await session.read_resource(uri)  # type: ignore[arg-type]
    content = result.contents[0]
    assert isinstance(content, TextResourceContents)
    assert content.mimeType == "application/json"
    return json.loads(content.text)
