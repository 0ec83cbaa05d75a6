"""Redis losing its data under the Telegram inbox: FLUSHALL, a restart without persistence,
and Redis down when the gateway starts. The next update is still handled, promptly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.process import ManagedProcess, require_binary, wait_until
from dexorder.devenv.redis import RedisService
from dexorder.gateway.channels.telegram.cli import register_webhook
from dexorder.gateway.channels.telegram.inbox import InboxOptions, RedisInbox
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import (
    TelegramGateway,
    serve_telegram_gateway,
    telegram_values,
)
from tests.integration.gateway.telegram.replica import FAST
from tests.integration.gateway.telegram.test_inbox import Recorder, running, until

INBOX_LOGGER = "dexorder.gateway.channels.telegram.inbox"
# What the issue allows: an update is handled within the claim time plus 5 s.
HANDLED_WITHIN = FAST.inbox.claim_idle_seconds + 5.0


class StoppableRedis(RedisService):
    """A private Redis that can go down and come back on the same port, empty or not."""

    def go_down(self) -> None:
        self._stop_processes()

    def pause(self) -> None:
        """Stop answering, with every connection left open (a partition, a frozen host)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def come_back(self, *, keep_data: bool = False) -> None:
        if not keep_data:
            # Its append-only files removed: a restart without persistence.
            shutil.rmtree(self.data_dir / "appendonlydir", ignore_errors=True)
        self._process = ManagedProcess(
            "redis-server",
            [require_binary("redis-server", "apt-get install redis-server"), "redis.conf"],
            log_path=self.data_dir / "redis.log",
            cwd=self.data_dir,
        ).start()
        wait_until(self._answers, timeout=15, what="redis back", process=self._process)

    def _answers(self) -> bool:
        with sync_redis.Redis.from_url(self.url, socket_connect_timeout=1) as connection:
            return bool(connection.ping())


@pytest.fixture
def own_redis() -> Iterator[StoppableRedis]:
    with StoppableRedis() as service:
        yield service


async def chat_once(
    gateway: TelegramGateway, llm: FakeLLMServer, chat_id: int, user: int, text: str
) -> None:
    """Deliver a message and wait for its final reply; a handled update shows activity
    (typing, a draft) within ``HANDLED_WITHIN``."""
    fake = gateway.fake
    calls_before = len(fake.calls)
    finals_before = len(fake.calls_of("sendMessage", chat_id))
    llm.queue(TextScript(text=f"Answer to {text}."))
    update = fake.message_update(text, chat_id=chat_id, user_id=user)
    assert await fake.deliver(update) == 200
    await fake.wait_for(
        lambda: any(
            call.params.get("chat_id") == str(chat_id) for call in fake.calls[calls_before:]
        ),
        timeout=HANDLED_WITHIN,
        what=f"the update {text!r} to be handled",
    )
    await fake.wait_for(
        lambda: len(fake.calls_of("sendMessage", chat_id)) > finals_before,
        timeout=60,
        what=f"the reply to {text!r}",
    )
    assert fake.calls_of("sendMessage", chat_id)[-1].text == f"Answer to {text}."


async def ready(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/ready") as answer:
        body: dict[str, Any] = await answer.json()
        return body


async def inbox_ready(url: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not (await ready(url))["checks"]["telegram_inbox"]:  # noqa: ASYNC110 - polled over HTTP
            await asyncio.sleep(0.1)


def inbox_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name == INBOX_LOGGER and record.levelno >= logging.WARNING
    )


async def test_after_flushall_the_next_update_is_handled(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
    telegram_redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=INBOX_LOGGER)
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    await chat_once(tg_gateway, llm, chat_id, telegram_user, "before")
    redis = Redis.from_url(telegram_redis_url)
    try:
        await redis.flushall()
    finally:
        await redis.aclose()
    # The webhook's XADD makes the stream again at once; the group comes back with it.
    await chat_once(tg_gateway, llm, chat_id, telegram_user, "after the wipe")
    await chat_once(tg_gateway, llm, chat_id, telegram_user, "and again")
    assert (await ready(tg_gateway.url))["checks"]["telegram_inbox"] is True
    assert inbox_warnings(caplog) < 20


async def test_redis_restarted_without_its_data_and_down_at_start(
    own_redis: StoppableRedis,
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    user_id: str,
    telegram_ids: tuple[int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=INBOX_LOGGER)
    chat_id, telegram_user = telegram_ids
    settings = gateway_settings(
        migrated_dsn, issuer, llm, tmp_path, **telegram_values(fake_telegram, own_redis.url)
    )
    own_redis.go_down()  # the gateway starts while Redis is away
    async with serve_telegram_gateway(settings, fake_telegram) as gateway:
        await register_webhook(settings.model_copy(update={"public_url": gateway.url}))
        await asyncio.sleep(1.0)
        body = await ready(gateway.url)
        assert body["checks"]["telegram_inbox"] is False, body
        assert (
            await fake_telegram.deliver(
                fake_telegram.message_update("lost?", chat_id=chat_id, user_id=telegram_user)
            )
            == 503
        ), "not persisted, so Telegram must retry it"
        own_redis.come_back()
        await inbox_ready(gateway.url)  # within the Redis client's circuit cooldown
        await gateway.link(issuer.mint(user_id), chat_id, telegram_user)
        await chat_once(gateway, llm, chat_id, telegram_user, "first")
        assert (await ready(gateway.url))["checks"]["telegram_inbox"] is True
        # Down and back empty: the stream, the group and every key are gone.
        own_redis.go_down()
        await asyncio.sleep(1.0)
        assert (await ready(gateway.url))["checks"]["telegram_inbox"] is False
        own_redis.come_back()
        await inbox_ready(gateway.url)
        await chat_once(gateway, llm, chat_id, telegram_user, "after the restart")
        assert (await ready(gateway.url))["checks"]["telegram_inbox"] is True
    assert inbox_warnings(caplog) < 20


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_an_inbox_started_while_redis_is_down_reads_once_it_is_back(
    own_redis: StoppableRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=INBOX_LOGGER)
    options = InboxOptions(claim_idle_seconds=0.6, block_ms=100, retry_cap_seconds=0.5)
    own_redis.go_down()
    async with client(own_redis.url) as redis:
        inbox, recorder = RedisInbox(redis, options), Recorder()
        async with running(inbox, recorder):
            await asyncio.sleep(3.0)  # many failed attempts, a handful of warnings
            assert not await inbox.healthy()
            own_redis.come_back()
            await inbox.put(1, b"{}")
            await until(lambda: recorder.seen == [1], timeout=HANDLED_WITHIN)
            assert await inbox.healthy()
    assert 1 <= inbox_warnings(caplog) < 5
