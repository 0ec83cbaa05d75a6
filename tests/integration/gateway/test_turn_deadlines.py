"""A turn has an upper bound, whatever the model's connection does: a stream of keep-alive
comments does not keep it waiting, and nor does a reply that never ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FailureScript, FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from tests.integration.gateway.conftest import (
    RunningGateway,
    gateway_settings,
    open_chat,
    serve_gateway,
)

FIRST_TOKEN_SECONDS = 3.0
TURN_SECONDS = 6.0


@pytest.fixture
async def bounded_gateway(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        # The model's own read timeout is far away: only the turn's deadlines can end it.
        llm_timeout_seconds=300,
        turn_first_token_seconds=FIRST_TOKEN_SECONDS,
        turn_deadline_seconds=TURN_SECONDS,
    )
    async with serve_gateway(settings) as running:
        yield running


async def test_keep_alive_comments_do_not_keep_a_turn_waiting_for_its_first_token(
    bounded_gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    for _ in range(4):  # every deployment the route may try sends only keep-alives
        llm.queue(FailureScript(failure="keep_alive_only"))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, bounded_gateway, issuer, user_id)
        await client.send({"type": "message", "content": "hello?"})
        error = (await client.until("error", timeout=FIRST_TOKEN_SECONDS + 30))[-1]
        await client.ws.close()
    assert error["code"] == "llm_error"
    assert "began no reply" in error["message"]


async def test_a_reply_that_goes_on_and_on_ends_at_the_turn_deadline(
    bounded_gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    llm.queue(TextScript(text=" ".join(["on"] * 1000), tokens_per_second=5))
    async with aiohttp.ClientSession() as http:
        client, _ = await open_chat(http, bounded_gateway, issuer, user_id)
        await client.send({"type": "message", "content": "keep talking"})
        frames = await client.until("error", timeout=TURN_SECONDS + 30)
        await client.ws.close()
    assert any(f["type"] == "delta" for f in frames)
    assert "took longer than" in frames[-1]["message"]
