"""Refusals and fallbacks a user sees through the chat channel: licenses and unverifiable tokens."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import psycopg
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import free_port
from tests.integration.gateway.conftest import (
    AUDIENCE,
    ISSUER,
    RunningGateway,
    connect,
    gateway_settings,
    serve_gateway,
)

WS_TRY_AGAIN_LATER = 1013


async def test_an_expired_license_falls_back_to_free_and_the_user_is_told(
    gateway: RunningGateway,
    issuer: LocalJwksIssuer,
    migrated_dsn: str,
    user_id: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True) as db:
        await db.execute(
            "INSERT INTO user_licenses (user_id, license_type, expires_at) "
            "VALUES (%s, 'pro', now() - interval '1 day')",
            (user_id,),
        )
    async with aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        ready = await client.next()
        assert ready["type"] == "ready"
        assert ready["tier"] == "free"
        notice = await client.next()
        assert notice["type"] == "status"
        assert "pro license expired" in notice["message"]
        await client.ws.close()


async def test_without_auto_enroll_an_unknown_user_is_refused_with_a_clear_message(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    settings = gateway_settings(migrated_dsn, issuer, llm, tmp_path, auto_enroll=False)
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        client = await connect(session, gateway, issuer.mint(user_id))
        error = await client.next()
        assert error["type"] == "error"
        assert error["code"] == "license_refused"
        assert "Ask your administrator" in error["message"]
        closed = await client.ws.receive(timeout=10)
        assert closed.type == aiohttp.WSMsgType.CLOSE
        assert client.ws.close_code == 4403
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as db:
        cursor = await db.execute("SELECT 1 FROM user_licenses WHERE user_id = %s", (user_id,))
        assert await cursor.fetchall() == []


async def test_keys_that_cannot_be_fetched_are_the_gateways_fault_not_the_users(
    migrated_dsn: str, llm: FakeLLMServer, tmp_path: Path, user_id: str
) -> None:
    # A real issuer signs the token, then goes away before the gateway ever saw its keys.
    async with LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE) as gone:
        token = gone.mint(user_id)
        settings = gateway_settings(migrated_dsn, gone, llm, tmp_path)
    settings = settings.model_copy(
        update={"jwks_url": f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"}
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(gateway.ws_url, headers={"Authorization": f"Bearer {token}"})
        assert refused.value.status == 503

        client = await connect(session, gateway, token, header=False)
        closed = await client.ws.receive(timeout=10)
        assert closed.type == aiohttp.WSMsgType.CLOSE
        assert client.ws.close_code == WS_TRY_AGAIN_LATER
        assert closed.extra == "keys_unavailable"
