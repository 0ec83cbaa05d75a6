"""``dexorder-gateway set-webhook``: register the webhook URL and secret with the Bot API."""

from __future__ import annotations

import asyncio
import sys

from aiogram.exceptions import TelegramAPIError

from dexorder.gateway.channels.telegram.bot import TelegramNotConfigured, make_bot, webhook_url
from dexorder.gateway.settings import GatewaySettings, env_name

ALLOWED_UPDATES = ["message", "callback_query"]


async def register_webhook(settings: GatewaySettings) -> str:
    """Tell Telegram to POST updates to ``public_url`` + ``/webhook/telegram`` with the secret."""
    url = webhook_url(settings)
    if settings.telegram_webhook_secret is None:
        raise TelegramNotConfigured(f"{env_name('telegram_webhook_secret')} is not set")
    bot = make_bot(settings)
    try:
        await bot.set_webhook(
            url=url,
            secret_token=settings.telegram_webhook_secret.get_secret_value(),
            allowed_updates=ALLOWED_UPDATES,
        )
    finally:
        await bot.session.close()
    return url


def set_webhook(settings: GatewaySettings) -> int:
    try:
        url = asyncio.run(register_webhook(settings))
    except TelegramNotConfigured as error:
        print(f"dexorder-gateway set-webhook: {error}", file=sys.stderr)
        return 2
    except TelegramAPIError as error:
        print(f"dexorder-gateway set-webhook: the Bot API refused: {error}", file=sys.stderr)
        return 1
    print(f"Telegram webhook set to {url}")
    return 0
