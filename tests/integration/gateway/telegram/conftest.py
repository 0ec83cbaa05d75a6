"""A gateway with the Telegram channel on, against real PostgreSQL, real Redis, real agent
processes, the scripted LLM, and the local Bot API server (``FakeTelegram``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import free_port
from dexorder.gateway.app import create_app
from dexorder.gateway.channels.telegram import TELEGRAM_OPTIONS, TelegramOptions
from dexorder.gateway.channels.telegram.cli import register_webhook
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.replica import FAST

WEBHOOK_SECRET = "test-webhook-secret_0123456789abcdef"  # 32+ of A-Z a-z 0-9 _ -
# Redis database of these tests, flushed before each: other tests use database 0.
REDIS_DB = 9


def telegram_values(fake: FakeTelegram, redis_url: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {
        "telegram_bot_token": fake.token,
        "telegram_webhook_secret": WEBHOOK_SECRET,
        "telegram_api_url": fake.url,
    }
    if redis_url is not None:
        values["redis_url"] = redis_url
    return values


def isolated_redis_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"


@pytest.fixture
async def telegram_redis_url(redis_url: str) -> str:
    url = isolated_redis_url(redis_url)
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest.fixture
async def fake_telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@dataclass
class TelegramGateway:
    url: str
    app: web.Application
    settings: GatewaySettings
    fake: FakeTelegram

    async def link(self, token: str, chat_id: int, telegram_user: int) -> None:
        """The whole linking flow: a code from the API, then ``/link CODE`` in Telegram."""
        code = await issue_code(self.url, token)
        before = len(self.fake.calls_of("sendMessage", chat_id))
        update = self.fake.message_update(f"/link {code}", chat_id=chat_id, user_id=telegram_user)
        assert await self.fake.deliver(update) == 200
        await self.fake.wait_for(
            lambda: len(self.fake.calls_of("sendMessage", chat_id)) > before, what="link reply"
        )
        assert self.fake.calls_of("sendMessage", chat_id)[-1].text.startswith("Linked.")


async def issue_code(url: str, token: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/api/link-codes", headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        assert answer.status == 201, await answer.text()
        body = await answer.json()
    return str(body["code"])


@contextlib.asynccontextmanager
async def serve_telegram_gateway(
    settings: GatewaySettings, fake: FakeTelegram, options: TelegramOptions = FAST
) -> AsyncIterator[TelegramGateway]:
    app = create_app(settings)
    app[TELEGRAM_OPTIONS] = options
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        yield TelegramGateway(url, app, settings, fake)
    finally:
        cleanup = asyncio.create_task(runner.cleanup())
        done, _ = await asyncio.wait({cleanup}, timeout=60)
        if not done:
            # A stuck shutdown is a bug: show every task's stack before failing.
            for task in asyncio.all_tasks():
                task.print_stack(file=sys.stderr)
            cleanup.cancel()
            raise AssertionError("the gateway did not shut down within 60 s")
        cleanup.result()


@pytest.fixture
async def tg_gateway(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
) -> AsyncIterator[TelegramGateway]:
    settings = gateway_settings(
        migrated_dsn, issuer, llm, tmp_path, **telegram_values(fake_telegram, telegram_redis_url)
    )
    async with serve_telegram_gateway(settings, fake_telegram) as running:
        public = settings.model_copy(update={"public_url": running.url})
        await register_webhook(public)  # what `dexorder-gateway set-webhook` does
        yield running


@pytest.fixture
def telegram_ids() -> tuple[int, int]:
    """A fresh (chat id, Telegram user id) of a private chat."""
    number = uuid.uuid4().int % 1_000_000_000 + 1
    return number, number
