"""A real gateway on loopback: real PostgreSQL, a real JWKS server, real agent processes
(local provisioner) and the scripted OpenAI-compatible server, with litellm pointed at it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from mcp.server.fastmcp import FastMCP
from starlette.types import ASGIApp, Receive, Scope, Send

from dexorder.devenv.fake_llm import FAKE_API_KEY, FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.node_chart import scripted_models_yaml as models_yaml
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.devenv.process import free_port
from dexorder.gateway.app import create_app
from dexorder.gateway.conversation import Conversation
from dexorder.gateway.migrations import apply_migrations
from dexorder.gateway.settings import GatewaySettings
from dexorder.gateway.state import LIVE_SOCKETS, METRICS_PORT

if TYPE_CHECKING:
    from tests.integration.gateway.gateway_process import GatewayProcess

ISSUER = "https://id.test.dexorder"
AUDIENCE = "dexorder-gateway"


@pytest.fixture(scope="module")
async def migrated_dsn(postgres_dsn: str) -> str:
    await apply_migrations(postgres_dsn)
    return postgres_dsn


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLMServer]:
    server = FakeLLMServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def issuer() -> AsyncIterator[LocalJwksIssuer]:
    async with LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE) as running:
        yield running


def gateway_settings(
    dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, **overrides: Any
) -> GatewaySettings:
    models = tmp_path / "models.yaml"
    models.write_text(models_yaml(llm.base_url))
    values: dict[str, Any] = {
        "database_url": dsn,
        "jwks_url": issuer.jwks_url,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "openai_api_key": FAKE_API_KEY,
        "provisioner": "local",
        "local_agents_dir": str(tmp_path / "agents"),
        "metrics_port": 0,  # its own port, any free one: RunningGateway.metrics_url
        # Without KAFKA_BOOTSTRAP, turn events go to JSON lines: here, not in the home directory.
        "events_dir": str(tmp_path / "events"),
        "tiers_path": str(TIER_CATALOG),
        "models_path": str(models),
        "license_cache_seconds": 0,
        "drain_seconds": 5,
        **overrides,
    }
    return GatewaySettings.from_values(values)


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws/chat"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app[METRICS_PORT]}/metrics"


@contextlib.asynccontextmanager
async def serve_gateway(settings: GatewaySettings) -> AsyncIterator[RunningGateway]:
    """A gateway app in this event loop on a free loopback port, cleaned up on exit."""
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield RunningGateway(f"http://127.0.0.1:{port}", app, runner)
    finally:
        await runner.cleanup()


@pytest.fixture
async def gateway(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    async with serve_gateway(gateway_settings(migrated_dsn, issuer, llm, tmp_path)) as running:
        yield running


class ChatClient:
    """A protocol client for tests: send frames, read them, wait for a type."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def next(self, timeout: float = 30) -> dict[str, Any]:
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise AssertionError(
                f"expected a frame, got {message.type} {message.data!r} {message.extra!r}"
            )
        frame: dict[str, Any] = json.loads(message.data)
        self.frames.append(frame)
        return frame

    async def until(self, kind: str, timeout: float = 60) -> list[dict[str, Any]]:
        """Frames up to and including the first of type ``kind``."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next(timeout)
                seen.append(frame)
                if frame["type"] == kind:
                    return seen


async def connect(
    session: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str,
    *,
    header: bool = True,
    query: str = "",
) -> ChatClient:
    """Open a chat socket, with the token in the upgrade's header or as the first frame."""
    headers = {"Authorization": f"Bearer {token}"} if header else {}
    ws = await session.ws_connect(gateway.ws_url + query, headers=headers)
    client = ChatClient(ws)
    if not header:
        await client.send({"type": "auth", "token": token})
    return client


async def open_chat(
    http: aiohttp.ClientSession, gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> tuple[ChatClient, str]:
    client = await connect(http, gateway, issuer.mint(user_id))
    ready = (await client.until("ready"))[-1]
    return client, str(ready["session_id"])


def conversation_of(gateway: RunningGateway, session_id: str) -> Conversation:
    return next(c for c in gateway.app[LIVE_SOCKETS].values() if c.session_id == session_id)


def reply_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "delta")


@pytest.fixture
def user_id() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def serving(
    server: FastMCP[Any], *, peers: list[tuple[str, int]] | None = None
) -> AsyncIterator[str]:
    """Another MCP server than ours (the SDK's, configured as a user's own might be).

    ``peers``, when given, gets the client's address and port of each HTTP request: one
    port for many requests is one pooled connection.
    """
    port = free_port()
    app: ASGIApp = server.streamable_http_app()
    if peers is not None:
        inner = app

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope.get("client"):
                host, client_port = scope["client"]
                peers.append((host, client_port))
            await inner(scope, receive, send)

        app = recording
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    runner = uvicorn.Server(config)
    task = asyncio.create_task(runner.serve())
    try:
        async with asyncio.timeout(30):
            while not runner.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        runner.should_exit = True
        await task


@pytest.fixture
async def two_gateways(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    redis_url: str,
) -> AsyncIterator[tuple[RunningGateway, RunningGateway]]:
    """Two gateways, each on its own port with its own agents, sharing one Redis."""

    def settings(name: str) -> Any:
        return gateway_settings(
            migrated_dsn,
            issuer,
            llm,
            tmp_path / name,
            redis_url=redis_url,
            local_agents_dir=str(tmp_path / name / "agents"),
        )

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serve_gateway(settings("a")) as first, serve_gateway(settings("b")) as second:
        yield first, second


@pytest.fixture
def started() -> Iterator[list[GatewayProcess]]:
    """Every gateway process a test starts, stopped at the end whatever happened."""
    processes: list[GatewayProcess] = []
    yield processes
    for process in processes:
        process.stop()
