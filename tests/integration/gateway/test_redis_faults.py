"""Redis that stops answering, on the real server (paused with SIGSTOP, connections open):
a chat message fails with a clear error in bounded time instead of hanging, and chat
works again once Redis does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.stores.redis_client import BreakerPolicy
from tests.integration.gateway.conftest import (
    gateway_settings,
    open_chat,
    reply_text,
    serve_gateway,
)
from tests.integration.gateway.telegram.test_redis_wipe import StoppableRedis


@pytest.fixture
def own_redis() -> Iterator[StoppableRedis]:
    with StoppableRedis() as service:
        yield service


async def test_a_paused_redis_fails_a_message_in_bounded_time(
    own_redis: StoppableRedis,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    user_id: str,
) -> None:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        redis_url=own_redis.url,
        redis_socket_timeout_seconds=2,
    )
    async with serve_gateway(settings) as gateway, aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, gateway, issuer, user_id)
        await asyncio.to_thread(own_redis.pause)
        try:
            await client.send({"type": "message", "content": "are you there?"})
            # A few 2 s timeouts, then the circuit fails the rest at once: never forever.
            frames = await client.until("error", timeout=30)
            assert frames[-1]["code"] == "service_unavailable", frames[-1]
        finally:
            await asyncio.to_thread(own_redis.resume)
        # The circuit lets a connection through once its cooldown is over.
        await asyncio.sleep(BreakerPolicy().cooldown_seconds + 1)
        llm.queue(TextScript(text="Back."))
        await client.send({"type": "message", "content": "and now?"})
        assert reply_text(await client.until("done", timeout=60)) == "Back."
        await client.ws.close()
