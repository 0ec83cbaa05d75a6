"""``dexorder-gateway set-webhook`` against the local Bot API server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dexorder.devenv.fake_telegram import FakeTelegram
from dexorder.gateway.channels.telegram.cli import set_webhook
from dexorder.gateway.settings import GatewaySettings
from tests.integration.gateway.telegram.conftest import WEBHOOK_SECRET


def settings_for(fake: FakeTelegram, **extra: Any) -> GatewaySettings:
    return GatewaySettings.from_values(
        {
            "database_url": "postgresql://127.0.0.1:9/unused",
            "jwt_issuer": "https://id.test",
            "jwt_audience": "dexorder-gateway",
            "dev_hs256_secret": "x" * 32,
            "telegram_bot_token": fake.token,
            "telegram_webhook_secret": WEBHOOK_SECRET,
            "telegram_api_url": fake.url,
            **extra,
        }
    )


async def test_set_webhook_registers_public_url_and_secret(
    fake_telegram: FakeTelegram, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(fake_telegram, public_url="https://chat.example.test/")
    # The command runs its own event loop, as from a shell: in a thread here.
    assert await asyncio.to_thread(set_webhook, settings) == 0
    assert fake_telegram.webhook_url == "https://chat.example.test/webhook/telegram"
    assert fake_telegram.webhook_secret == WEBHOOK_SECRET
    assert "https://chat.example.test/webhook/telegram" in capsys.readouterr().out


async def test_set_webhook_without_a_public_url_names_the_setting(
    fake_telegram: FakeTelegram, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await asyncio.to_thread(set_webhook, settings_for(fake_telegram)) == 2
    assert "DEXORDER_PUBLIC_URL" in capsys.readouterr().err
    assert fake_telegram.calls_of("setWebhook") == []


async def test_set_webhook_reports_a_refusal(
    fake_telegram: FakeTelegram, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(fake_telegram, public_url="https://chat.example.test")
    fake_telegram.fail_next("setWebhook", times=5, retry_after=1)
    assert await asyncio.to_thread(set_webhook, settings) == 1
    assert "refused" in capsys.readouterr().err
