"""Test 5 of issue 20: the rate limits hold across two gateway processes sharing Redis.
A free user's messages split over both replicas are refused exactly once past the
minute's limit (with ``retry_after``), and one replica's running generation refuses a
second one on the other replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dexorder.core.tiers import parse_tier_catalog
from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.paths import TIER_CATALOG
from tests.integration.gateway.conftest import ChatClient
from tests.integration.gateway.gateway_process import GatewayProcess, gateway_env
from tests.integration.gateway.test_gateway_process import open_chat

FREE = parse_tier_catalog(TIER_CATALOG.read_text()).get("free").rate_limits


@pytest.fixture
async def redis_db(redis_url: str) -> str:
    """A database of the session Redis for these replicas alone, emptied first."""
    from redis.asyncio import Redis

    url = redis_url.rsplit("/", 1)[0] + "/11"
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest.fixture
def replicas(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    redis_db: str,
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        for name in ("replica-a", "replica-b"):
            root = tmp_path / name
            root.mkdir()
            env = gateway_env(migrated_dsn, issuer, llm, root, REDIS_URL=redis_db)
            started.append(GatewayProcess(env, root, name=name).start())
        yield started[0], started[1]
    finally:
        for process in started:
            process.stop()


async def outcome(client: ChatClient) -> dict[str, Any]:
    """The frame that ends a message: ``done``, or the ``error`` that refused it."""
    while True:
        frame = await client.next(timeout=90)
        if frame["type"] in ("done", "error"):
            return frame


async def test_the_minute_limit_holds_across_replicas(
    replicas: tuple[GatewayProcess, GatewayProcess],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    first, second = replicas
    limit = FREE.messages_per_minute
    async with aiohttp.ClientSession() as http:
        clients = [
            await open_chat(http, first.ws_url, issuer.mint(user_id)),
            await open_chat(http, second.ws_url, issuer.mint(user_id)),
        ]
        outcomes: list[dict[str, Any]] = []
        for n in range(limit + 1):
            client = clients[n % 2]
            llm.queue(TextScript(text=f"Answer {n}."))
            await client.send({"type": "message", "content": f"question {n}"})
            outcomes.append(await outcome(client))
        for client in clients:
            await client.ws.close()
    refused = [frame for frame in outcomes if frame["type"] == "error"]
    assert len(refused) == 1, outcomes
    assert refused[0]["code"] == "rate_limited"
    assert refused[0]["retry_after"] > 0
    assert outcomes[-1] is refused[0], "the message past the limit, and only it"


async def test_the_concurrent_generation_cap_holds_across_replicas(
    replicas: tuple[GatewayProcess, GatewayProcess],
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
) -> None:
    assert FREE.concurrent_generations == 1
    first, second = replicas
    async with aiohttp.ClientSession() as http:
        on_first = await open_chat(http, first.ws_url, issuer.mint(user_id))
        on_second = await open_chat(http, second.ws_url, issuer.mint(user_id))
        llm.queue(TextScript(text=" ".join(["slow"] * 60), tokens_per_second=10))
        await on_first.send({"type": "message", "content": "a long one"})
        while (await on_first.next(timeout=90))["type"] != "delta":
            pass  # generating on the first replica now
        await on_second.send({"type": "message", "content": "and one at the same time"})
        refused = await outcome(on_second)
        assert refused["type"] == "error", refused
        assert refused["code"] == "rate_limited"
        assert "concurrent generation" in refused["message"], refused
        assert (await outcome(on_first))["type"] == "done"
        # The slot is free again: the second replica may generate now.
        llm.queue(TextScript(text="Now me."))
        await on_second.send({"type": "message", "content": "my turn?"})
        assert (await outcome(on_second))["type"] == "done"
        await asyncio.gather(on_first.ws.close(), on_second.ws.close())
