"""A busy Telegram: the end of a reply is never dropped after 429s, and ``/stop`` is heard
even when every worker is busy writing replies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.telegram.cli import register_webhook
from tests.integration.gateway.conftest import gateway_settings
from tests.integration.gateway.telegram.conftest import (
    TelegramGateway,
    serve_telegram_gateway,
    telegram_values,
)
from tests.integration.gateway.telegram.replica import FAST
from tests.integration.gateway.telegram.test_chat import final_messages, send


async def test_the_last_piece_of_a_reply_survives_repeated_429s(
    tg_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = tg_gateway.fake
    chat_id, telegram_user = telegram_ids
    await tg_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    before = len(final_messages(fake, chat_id))
    llm.queue(TextScript(text="The end of this reply matters.", tokens_per_second=20))
    fake.fail_next("sendMessage", times=7, retry_after=1)  # more than any fixed retry count
    await send(fake, chat_id, telegram_user, "hi")
    await fake.wait_for(
        lambda: len(final_messages(fake, chat_id)) > before, timeout=60, what="the final reply"
    )
    assert final_messages(fake, chat_id)[-1].text == "The end of this reply matters."
    refused = [call for call in fake.calls_of("sendMessage", chat_id) if call.status == 429]
    assert len(refused) == 7


@pytest.fixture
async def one_worker_gateway(
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
    options = replace(FAST, inbox=replace(FAST.inbox, concurrency=1))
    async with serve_telegram_gateway(settings, fake_telegram, options) as running:
        await register_webhook(settings.model_copy(update={"public_url": running.url}))
        yield running


async def test_stop_is_heard_while_every_worker_is_busy(
    one_worker_gateway: TelegramGateway,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    user_id: str,
    telegram_ids: tuple[int, int],
) -> None:
    fake = one_worker_gateway.fake
    chat_id, telegram_user = telegram_ids
    await one_worker_gateway.link(issuer.mint(user_id), chat_id, telegram_user)
    llm.queue(TextScript(text=" ".join(["slow"] * 300), tokens_per_second=5))
    await send(fake, chat_id, telegram_user, "a long answer please")
    await fake.wait_for(
        lambda: any("slow" in call.text for call in fake.calls_of("sendMessageDraft", chat_id)),
        timeout=90,
        what="the reply to start",
    )
    # The only worker writes that reply: /stop must not wait for it to end (a minute).
    await send(fake, chat_id, telegram_user, "/stop")
    await fake.wait_for(
        lambda: any("(stopped)" in call.text for call in final_messages(fake, chat_id)),
        timeout=20,
        what="the stopped reply",
    )
    await fake.wait_for(
        lambda: any(call.text == "Stopping the reply." for call in final_messages(fake, chat_id)),
        timeout=20,
        what="the /stop answer",
    )
    stopped = next(call for call in final_messages(fake, chat_id) if "(stopped)" in call.text)
    assert stopped.text.count("slow") < 300


async def test_many_chats_streaming_at_once_stay_under_the_bot_wide_limit(
    migrated_dsn: str,
    issuer: LocalJwksIssuer,
    llm: FakeLLMServer,
    tmp_path: Path,
    fake_telegram: FakeTelegram,
    telegram_redis_url: str,
) -> None:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        **telegram_values(fake_telegram, telegram_redis_url),
        telegram_calls_per_second=6,
    )
    chats = [(900_000_001 + n, f"user-rate-{n}-{tmp_path.name[-6:]}") for n in range(3)]
    async with serve_telegram_gateway(settings, fake_telegram) as gateway:
        await register_webhook(settings.model_copy(update={"public_url": gateway.url}))
        for chat_id, user in chats:
            await gateway.link(issuer.mint(user), chat_id, chat_id)
        fake_telegram.limit_rate(8)  # Telegram's flood limit, scaled down
        words = " ".join(f"word{n}" for n in range(40))
        for _ in chats:
            llm.queue(TextScript(text=words, tokens_per_second=15))
        for chat_id, _user in chats:
            await send(fake_telegram, chat_id, chat_id, "stream please")
        await fake_telegram.wait_for(
            lambda: all(
                any(call.text == words for call in final_messages(fake_telegram, chat_id))
                for chat_id, _ in chats
            ),
            timeout=90,
            what="every chat's reply",
        )
        refused = [call for call in fake_telegram.calls if call.status == 429]
        assert refused == [], f"{len(refused)} calls refused for flooding"
        drafts = [
            c for chat_id, _ in chats for c in fake_telegram.calls_of("sendMessageDraft", chat_id)
        ]
        assert len(drafts) >= 6, "the replies still streamed"
