"""A socket lives no longer than its token and its license, and a session is never handed
to another user (issue 21, item 8)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import psycopg
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.resume import detached_conversations
from dexorder.gateway.pure import protocol
from dexorder.gateway.state import SESSIONS
from dexorder.gateway.stores.sessions import MemorySessionStore
from tests.integration.gateway.conftest import (
    ChatClient,
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
)
from tests.integration.gateway.test_resume import drop, polled, start_slow_reply

LIFETIME = 3.0  # seconds a short-lived token is valid


async def closed_with(client: ChatClient, timeout: float = 30) -> int | None:
    """Read on until the socket closes; its close code."""
    async with asyncio.timeout(timeout):
        while True:
            message = await client.ws.receive()
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return client.ws.close_code
            if message.type == aiohttp.WSMsgType.TEXT:
                client.frames.append(json.loads(message.data))


async def test_a_socket_closes_with_4401_when_its_token_expires(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id, expires_in=LIFETIME))
        assert (await client.next())["type"] == "ready"
        assert await closed_with(client) == protocol.CLOSE_UNAUTHORIZED
        assert client.frames[-1]["code"] == "unauthorized"
        assert "token expired" in client.frames[-1]["message"]


async def test_an_auth_frame_with_a_fresh_token_keeps_the_socket_open(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        first_expiry = time.time() + LIFETIME
        client = await connect(session, gateway, issuer.mint(user_id, expires_in=LIFETIME))
        assert (await client.next())["type"] == "ready"
        await client.send({"type": "auth", "token": issuer.mint(user_id, expires_in=300)})
        renewed = await client.next()
        assert (renewed["type"], renewed["stage"]) == ("status", "ready")
        await asyncio.sleep(max(0.0, first_expiry - time.time()) + 2)  # past the first exp
        await client.send({"type": "ping"})
        assert (await client.next())["type"] == "pong"
        await client.ws.close()


async def test_an_auth_frame_for_another_user_closes_the_socket(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        assert (await client.next())["type"] == "ready"
        await client.send({"type": "auth", "token": issuer.mint(f"{user_id}-other")})
        assert await closed_with(client) == protocol.CLOSE_UNAUTHORIZED


async def test_a_withdrawn_license_closes_the_open_socket(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
        await db.execute(
            "INSERT INTO user_licenses (user_id, license_type) VALUES (%s, 'pro')", (user_id,)
        )
        settings = gateway_settings(
            migrated_dsn,
            issuer,
            llm,
            tmp_path,
            auto_enroll=False,
            license_cache_seconds=0,
            license_recheck_seconds=0.5,
        )
        async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
            client = await connect(session, gateway, issuer.mint(user_id))
            assert (await client.next())["type"] == "ready"
            await db.execute("DELETE FROM user_licenses WHERE user_id = %s", (user_id,))
            assert await closed_with(client) == protocol.CLOSE_FORBIDDEN
            assert client.frames[-1]["code"] == "license_refused"


async def test_a_detached_conversation_is_never_handed_to_another_user(
    gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    """The session store forgot whose session it was (expired, or wiped by a Redis restart)
    while the owner's dropped conversation still waits for them: another user presenting the
    session id gets a refusal, not the owner's conversation."""
    async with aiohttp.ClientSession() as session:
        owner, session_id, _ = await start_slow_reply(session, gateway, issuer.mint(user_id), llm)
        await drop(owner)
        await polled(lambda: len(detached_conversations(gateway.app)) == 1, timeout=30)
        store = gateway.app[SESSIONS]
        assert isinstance(store, MemorySessionStore)
        store._sessions.clear()  # what a wiped store looks like to the gateway

        intruder = await connect(
            session, gateway, issuer.mint(f"{user_id}-intruder"), query=f"?session={session_id}"
        )
        assert (await intruder.next())["type"] == "ready"
        refused = await intruder.next()
        assert (refused["type"], refused["code"]) == ("error", "unauthorized")
        assert await closed_with(intruder) == protocol.CLOSE_FORBIDDEN
        assert not [f for f in intruder.frames if f["type"] == "delta"]
        assert len(detached_conversations(gateway.app)) == 0


async def test_a_page_on_another_site_cannot_open_a_chat_socket(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                gateway.ws_url,
                headers={
                    "Authorization": f"Bearer {issuer.mint(user_id)}",
                    "Origin": "https://evil.example",
                },
            )
        assert refused.value.status == 403
        own = gateway.ws_url.replace("ws://", "http://").split("/ws/")[0]
        client = await connect(session, gateway, issuer.mint(user_id))
        await client.ws.close()
        ws = await session.ws_connect(
            gateway.ws_url,
            headers={"Authorization": f"Bearer {issuer.mint(user_id)}", "Origin": own},
        )
        await ws.close()


@pytest.mark.parametrize(
    "query",
    [
        "?session=abcdefgh%0A",  # a trailing newline that `^...$` with match() let through
        "?after=%C2%B2",  # "²": a digit to str.isdigit, not to int()
        "?after=%D9%A3",  # an Arabic-Indic three
    ],
)
async def test_malformed_query_values_get_400_before_the_upgrade(
    gateway: RunningGateway, issuer: LocalJwksIssuer, user_id: str, query: str
) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                gateway.ws_url + query,
                headers={"Authorization": f"Bearer {issuer.mint(user_id)}"},
            )
        assert refused.value.status == 400
        async with session.get(
            gateway.url + "/api/usage?days=%C2%B2",
            headers={"Authorization": f"Bearer {issuer.mint(user_id)}"},
        ) as usage:
            assert usage.status == 400
