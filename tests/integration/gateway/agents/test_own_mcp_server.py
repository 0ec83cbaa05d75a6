"""A license naming the user's own MCP server: the chat is served there, nothing is
provisioned, and the gateway presents the user's own credential, never the user's JWT, and
never one that opens another user's server."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web

from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.fake_llm.scripts import ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.agents.mcp_client import AgentSession
from dexorder.gateway.agents.provisioning import AgentEndpoint
from dexorder.gateway.pure.credentials import external_mcp_credential
from tests.integration.gateway.conftest import connect, gateway_settings, serve_gateway

SECRET = "the-operators-external-mcp-secret-0123456789"


async def test_a_license_with_its_own_mcp_server_is_served_there_without_provisioning(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    credential = external_mcp_credential(SECRET, user_id)
    with AgentProcess(user_id=user_id, token=credential) as own_server:
        async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
            await db.execute(
                "INSERT INTO user_licenses (user_id, license_type, mcp_server_url) "
                "VALUES (%s, 'pro', %s)",
                (user_id, own_server.url),
            )
        settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, external_mcp_secret=SECRET)
        async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
            llm.queue(ToolScript(name="remember", arguments={"text": "I trade ETH weekly"}))
            client = await connect(session, gateway, issuer.mint(user_id))
            await client.until("ready")
            await client.send({"type": "message", "content": "Remember that I trade ETH"})
            frames = await client.until("done", timeout=120)
            await client.ws.close()

        stages = [f["stage"] for f in frames if f["type"] == "status"]
        assert "provisioning" not in stages
        assert "starting" not in stages
        result = next(f for f in frames if f["type"] == "tool_result")
        assert not result["is_error"], result
        # Nothing was started for the user: the local provisioner's folder stayed empty.
        agents = tmp_path / "agents"
        assert not agents.exists() or not any(agents.iterdir())
        # The memory is on the user's own server.
        endpoint = AgentEndpoint(user_id, own_server.url, own_server.token)
        async with AgentSession(endpoint) as direct:
            recalled = await direct.call_tool("recall", {"query": "ETH"})
        assert "I trade ETH weekly" in json.dumps(recalled.content)


async def test_the_credential_a_user_sees_at_their_server_does_not_open_another_users(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    """User A logs the header the gateway sends to A's server and tries it on B's."""
    other = f"{user_id}-b"
    seen_by_a: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen_by_a.append(request.headers.get("Authorization", ""))
        return web.json_response({"error": "not an MCP server"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/mcp", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with AgentProcess(user_id=other, token=external_mcp_credential(SECRET, other)) as b_server:
            async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
                await db.execute(
                    "INSERT INTO user_licenses (user_id, license_type, mcp_server_url) "
                    "VALUES (%s, 'pro', %s)",
                    (user_id, f"http://127.0.0.1:{port}/mcp"),
                )
            settings = gateway_settings(
                migrated_dsn, issuer, llm, tmp_path, external_mcp_secret=SECRET
            )
            async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
                client = await connect(session, gateway, issuer.mint(user_id))
                await client.until("ready")
                await client.send({"type": "message", "content": "hello"})
                await client.until("error", timeout=120)
                await client.ws.close()
                assert seen_by_a, "the gateway never reached A's server"
                assert seen_by_a[0].startswith("Bearer ")
                async with session.post(
                    b_server.url, headers={"Authorization": seen_by_a[0]}, json={}
                ) as replayed:
                    assert replayed.status == 401
    finally:
        await runner.cleanup()
