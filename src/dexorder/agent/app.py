"""The ASGI app: MCP over streamable HTTP at ``/mcp`` behind bearer auth, and ``/healthz``."""

from __future__ import annotations

from typing import Any

from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from dexorder.agent import tools
from dexorder.agent.auth import BearerAuth
from dexorder.agent.limits import MAX_REQUEST_BODY_BYTES
from dexorder.agent.mcp_server import AgentMCP
from dexorder.agent.state import AgentState

MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"


def build_server(state: AgentState, token: str) -> FastMCP[Any]:
    # AgentMCP: FastMCP whose tools/call compiles each output schema's validator once.
    server: FastMCP[Any] = AgentMCP(
        name="dexorder-agent",
        instructions=tools.INSTRUCTIONS,
        streamable_http_path=MCP_PATH,
        # Sessions, so the gateway keeps one per chat; plain JSON replies, since no tool
        # streams progress and JSON is cheaper for both sides than an SSE stream per call.
        stateless_http=False,
        json_response=True,
        max_request_body_size=MAX_REQUEST_BODY_BYTES,
        # The Host header is the cluster Service name, not localhost; the bearer token,
        # not DNS-rebinding checks, is what protects this server.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        log_level="WARNING",
    )
    tools.register(server, state, approval_key=token)

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "user": state.user_id})

    # custom_route is an untyped decorator; calling it keeps healthz typed.
    server.custom_route(HEALTH_PATH, methods=["GET"], include_in_schema=False)(healthz)

    return server


def build_app(state: AgentState, token: str) -> ASGIApp:
    server = build_server(state, token)
    return BearerAuth(server.streamable_http_app(), token, protected_prefix=MCP_PATH)
