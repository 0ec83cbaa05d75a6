"""A license naming the user's own MCP server: the chat is served there, nothing is
provisioned, and the gateway presents its own credential, never the user's JWT."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import psycopg

from dexorder.devenv.agent import AgentProcess
from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.fake_llm.scripts import ToolScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.agents.mcp_client import AgentSession
from dexorder.gateway.agents.provisioning import AgentEndpoint
from tests.integration.gateway.conftest import connect, gateway_settings, serve_gateway


async def test_a_license_with_its_own_mcp_server_is_served_there_without_provisioning(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    with AgentProcess(user_id=user_id) as own_server:
        async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
            await db.execute(
                "INSERT INTO user_licenses (user_id, license_type, mcp_server_url) "
                "VALUES (%s, 'pro', %s)",
                (user_id, own_server.url),
            )
        settings = gateway_settings(
            migrated_dsn, issuer, llm, tmp_path, external_mcp_token=own_server.token
        )
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
