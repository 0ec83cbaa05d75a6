"""AgentMCP's tools/call answers exactly as the SDK's does, checking each output schema once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from jsonschema.validators import Draft202012Validator
from mcp import types
from mcp.server.fastmcp import FastMCP
from mcp.shared.memory import create_connected_server_and_client_session
from pydantic import BaseModel, WithJsonSchema

from dexorder.agent import tools
from dexorder.agent.mcp_server import SDK_REQUEST_LOGGER, AgentMCP, quiet_sdk_request_log
from dexorder.agent.state import AgentState

KEY = "the-agents-bearer-token"


class ClaimsAString(BaseModel):
    """Pydantic accepts and dumps an int, but the advertised schema says string."""

    count: Annotated[int, WithJsonSchema({"type": "string"})]


class NotJsonSchema(BaseModel):
    count: Annotated[int, WithJsonSchema({"type": 5})]


def add_test_tools(server: FastMCP[Any]) -> None:
    @server.tool()
    def echo(x: int) -> dict[str, Any]:
        return {"x": x}

    @server.tool()
    def mismatch() -> ClaimsAString:
        return ClaimsAString(count=3)

    @server.tool()
    def invalid_schema() -> NotJsonSchema:
        return NotJsonSchema(count=3)

    @server.tool()
    def fails() -> dict[str, Any]:
        raise ValueError("boom")

    @server.tool(structured_output=False)
    def plain() -> str:
        return "hi"


def with_test_tools(server: FastMCP[Any]) -> FastMCP[Any]:
    add_test_tools(server)
    return server


async def call(server: FastMCP[Any], name: str, arguments: dict[str, Any]) -> types.ServerResult:
    """The server's registered tools/call handler, as the SDK's dispatcher invokes it."""
    handler = server._mcp_server.request_handlers[types.CallToolRequest]
    request = types.CallToolRequest(
        params=types.CallToolRequestParams(name=name, arguments=arguments)
    )
    return await handler(request)


CASES = [
    ("echo", {"x": 1}),
    ("echo", {"x": "not a number"}),
    ("mismatch", {}),
    ("invalid_schema", {}),
    ("fails", {}),
    ("plain", {}),
    ("no_such_tool", {}),
]


@pytest.mark.parametrize(("name", "arguments"), CASES, ids=[f"{n}-{a}" for n, a in CASES])
async def test_each_result_is_the_one_the_sdk_gives(name: str, arguments: dict[str, Any]) -> None:
    ours = await call(with_test_tools(AgentMCP(name="t")), name, arguments)
    sdks = await call(with_test_tools(FastMCP(name="t")), name, arguments)
    assert ours.model_dump() == sdks.model_dump()


async def test_a_result_that_does_not_match_its_output_schema_is_an_error() -> None:
    server = with_test_tools(AgentMCP(name="t"))
    for _ in range(3):  # the cached validator catches it as the first did
        result = (await call(server, "mismatch", {})).root
        assert isinstance(result, types.CallToolResult)
        assert result.isError
        assert result.structuredContent is None
        text = result.content[0]
        assert isinstance(text, types.TextContent)
        assert text.text == "Output validation error: 3 is not of type 'string'"


@pytest.fixture
def schema_checks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each schema checked against the meta-schema (what jsonschema.validate does per call)."""
    checked: list[object] = []
    original = Draft202012Validator.check_schema

    def counting(schema: Any, *args: Any, **kwargs: Any) -> None:
        checked.append(schema)
        original(schema, *args, **kwargs)

    monkeypatch.setattr(Draft202012Validator, "check_schema", staticmethod(counting))
    return checked


async def test_each_output_schema_is_checked_once_not_on_every_call(
    schema_checks: list[object],
) -> None:
    ours = with_test_tools(AgentMCP(name="t"))
    for _ in range(5):
        await call(ours, "echo", {"x": 1})
        await call(ours, "mismatch", {})
    assert len(schema_checks) == 2

    schema_checks.clear()
    sdks = with_test_tools(FastMCP(name="t"))
    for _ in range(5):
        await call(sdks, "echo", {"x": 1})
    assert len(schema_checks) == 5, "the SDK checks the schema on every call"


async def test_a_tool_added_or_replaced_after_a_call_is_validated_against_its_own_schema() -> None:
    server = AgentMCP(name="t")

    @server.tool()
    def late() -> dict[str, Any]:
        return {"fine": True}

    first = (await call(server, "late", {})).root
    assert isinstance(first, types.CallToolResult)
    assert not first.isError
    server.remove_tool("late")

    @server.tool(name="late")
    def late_again() -> ClaimsAString:
        return ClaimsAString(count=1)

    result = (await call(server, "late", {})).root
    assert isinstance(result, types.CallToolResult)
    assert result.isError
    assert "Output validation error" in str(result.content[0])


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AgentState]:
    opened = AgentState.open("alice", tmp_path)
    yield opened
    opened.close()


async def test_the_agent_tools_are_advertised_as_by_the_sdk_and_answer_structured(
    state: AgentState,
) -> None:
    ours: FastMCP[Any] = AgentMCP(name="agent")
    sdks: FastMCP[Any] = FastMCP(name="agent")
    tools.register(ours, state, approval_key=KEY)
    tools.register(sdks, state, approval_key=KEY)
    advertised = [tool.model_dump() for tool in await ours.list_tools()]
    assert advertised == [tool.model_dump() for tool in await sdks.list_tools()]
    assert all(tool["outputSchema"] is not None for tool in advertised)

    # Through the SDK's own client, which checks structured results against the schema.
    async with create_connected_server_and_client_session(ours) as client:
        turns = [{"role": "user", "content": "hello"}]
        result = await client.call_tool("append_turns", {"session_id": "s1", "turns": turns})
        assert not result.isError
        assert result.structuredContent is not None
        assert result.structuredContent["appended"] == 1
        refused = await client.call_tool("append_turns", {"session_id": "s1", "turns": []})
        assert refused.isError
        assert "turns is empty" in str(refused.content[0])


@pytest.fixture
def sdk_logger_level() -> Iterator[logging.Logger]:
    """The SDK's request logger; it and the root logger get their levels back afterwards."""
    logger, root = logging.getLogger(SDK_REQUEST_LOGGER), logging.getLogger()
    before, root_before = logger.level, root.level
    yield logger
    logger.setLevel(before)
    root.setLevel(root_before)


@pytest.mark.parametrize(
    ("agent_level", "logs_each_request", "logs_warnings"),
    [
        ("debug", True, True),
        ("info", False, True),
        ("warning", False, True),
        ("error", False, False),
    ],
)
def test_the_sdk_logs_each_request_only_when_the_agent_logs_at_debug(
    sdk_logger_level: logging.Logger, agent_level: str, logs_each_request: bool, logs_warnings: bool
) -> None:
    logging.getLogger().setLevel(agent_level.upper())  # as the agent's main() does
    quiet_sdk_request_log(agent_level)
    assert sdk_logger_level.isEnabledFor(logging.INFO) is logs_each_request
    assert sdk_logger_level.isEnabledFor(logging.WARNING) is logs_warnings
