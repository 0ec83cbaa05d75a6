"""What one user can make the gateway spend: no agent for a connection alone, and a cap on
the sockets a user holds open (issue 21, item 3)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.pure import protocol
from dexorder.gateway.state import USER_SOCKETS
from tests.integration.gateway.conftest import (
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
)


async def test_connecting_provisions_nothing_until_the_first_message(
    gateway: RunningGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    tmp_path: Path,
) -> None:
    agents = tmp_path / "agents"  # the local provisioner's folder (gateway_settings)
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        assert (await client.next())["type"] == "ready"
        await client.send({"type": "ping"})
        # Nothing between `ready` and the pong: no provisioning for a connection.
        assert (await client.next())["type"] == "pong"
        assert not agents.exists() or not any(agents.iterdir())
        llm.queue(TextScript(text="Now you have an agent."))
        await client.send({"type": "message", "content": "hi"})
        frames = await client.until("done", timeout=120)
        stages = [f["stage"] for f in frames if f["type"] == "status"]
        assert stages[0] == "provisioning", stages
        assert any(agents.iterdir())
        await client.ws.close()


async def test_a_user_past_the_socket_cap_is_refused_and_admitted_after_closing_one(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, max_sockets_per_user=2)
    token = issuer.mint(user_id)
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        first = await connect(session, gateway, token)
        second = await connect(session, gateway, token)
        for client in (first, second):
            assert (await client.next())["type"] == "ready"
        # Another user is not affected by this one's sockets.
        other = await connect(session, gateway, issuer.mint(f"{user_id}-other"))
        assert (await other.next())["type"] == "ready"

        third = await connect(session, gateway, token)
        refused = await third.next()
        assert refused["type"] == "error"
        assert refused["code"] == "too_many_sockets"
        assert "2 connections" in refused["message"]
        await third.ws.receive()
        assert third.ws.close_code == protocol.CLOSE_TOO_MANY_SOCKETS

        await first.ws.close()
        # The slot is given back once the handler has let go of the closed socket.
        async with asyncio.timeout(30):
            while gateway.app[USER_SOCKETS][user_id] >= 2:  # noqa: ASYNC110 - app state, no event
                await asyncio.sleep(0.05)
        again = await connect(session, gateway, token)
        assert (await again.next())["type"] == "ready"
        for client in (second, other, again):
            await client.ws.close()
