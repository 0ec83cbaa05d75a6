"""``POST /webhook/telegram`` and ``set-webhook`` against the local Bot API server."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.chat import HELP
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import (
    WEBHOOK_SECRET,
    TelegramGateway,
    serve_telegram_gateway,
    telegram_values,
)


async def test_set_webhook_registers_the_url_and_the_secret(tg_gateway: TelegramGateway) -> None:
    fake = tg_gateway.fake
    assert fake.webhook_url == tg_gateway.url + "/webhook/telegram"
    assert fake.webhook_secret == WEBHOOK_SECRET
    call = fake.calls_of("setWebhook")[-1]
    assert call.params["secret_token"] == WEBHOOK_SECRET


async def test_a_wrong_or_missing_secret_is_forbidden_and_nothing_is_processed(
    tg_gateway: TelegramGateway, telegram_ids: tuple[int, int]
) -> None:
    fake = tg_gateway.fake
    chat_id, user = telegram_ids
    update = fake.message_update("/help", chat_id=chat_id, user_id=user)
    assert await fake.deliver(update, secret="wrong-secret") == 403
    assert await fake.deliver(update, secret=WEBHOOK_SECRET[:-1]) == 403
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.webhook_url or "", json=update) as answer,
    ):
        assert answer.status == 403
    await asyncio.sleep(0.5)
    assert fake.calls_of("sendMessage", chat_id) == []


async def test_a_body_that_is_not_an_update_is_refused(tg_gateway: TelegramGateway) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
    async with aiohttp.ClientSession() as session:
        for body in (b"not json", b"[]", b'{"message": {}}', b'{"update_id": "7"}'):
            async with session.post(
                tg_gateway.url + "/webhook/telegram", data=body, headers=headers
            ) as answer:
                assert answer.status == 400, body


async def test_a_repeated_update_is_answered_once(
    tg_gateway: TelegramGateway, telegram_ids: tuple[int, int]
) -> None:
    fake: FakeTelegram = tg_gateway.fake
    chat_id, user = telegram_ids
    update = fake.message_update("/help", chat_id=chat_id, user_id=user)
    statuses = await asyncio.gather(*(fake.deliver(update) for _ in range(3)))
    assert statuses == [200, 200, 200]
    await fake.wait_for(lambda: len(fake.calls_of("sendMessage", chat_id)) >= 1)
    await asyncio.sleep(1.0)
    replies = fake.calls_of("sendMessage", chat_id)
    assert len(replies) == 1
    assert replies[0].text == HELP


async def test_without_redis_updates_are_processed_in_process_and_still_once(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_ids: tuple[int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = gateway_settings(
        migrated_dsn, issuer, llm, tmp_path, **telegram_values(fake_telegram, None)
    )
    with caplog.at_level(logging.INFO, logger="dexorder.gateway.channels.telegram"):
        async with serve_telegram_gateway(settings, fake_telegram) as running:
            assert any("no REDIS_URL" in record.getMessage() for record in caplog.records)
            chat_id, user = telegram_ids
            update = fake_telegram.message_update("/help", chat_id=chat_id, user_id=user)
            url = running.url + "/webhook/telegram"
            for _ in range(3):
                assert await fake_telegram.deliver(update, url=url, secret=WEBHOOK_SECRET) == 200
            await fake_telegram.wait_for(
                lambda: bool(fake_telegram.calls_of("sendMessage", chat_id))
            )
            await asyncio.sleep(1.0)
    assert len(fake_telegram.calls_of("sendMessage", chat_id)) == 1
