"""The aiogram ``Bot`` of the gateway, pointed at ``telegram_api_url`` (a local server in tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiogram import Bot
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.session.middlewares.base import (
    BaseRequestMiddleware,
    NextRequestMiddlewareType,
)
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode

from dexorder.gateway.pure.ratelimit import TokenBucket
from dexorder.gateway.settings import GatewaySettings, env_name

WEBHOOK_PATH = "/webhook/telegram"


class TelegramNotConfigured(Exception):
    pass


class BotRateLimit(BaseRequestMiddleware):
    """Every Bot API call of this process waits for a token of one bucket: drafts every
    0.3 s in many chats at once stay under Telegram's bot-wide limit instead of setting
    off a storm of 429s (whose waits would then delay every chat's replies)."""

    def __init__(self, bucket: TokenBucket, clock: Callable[[], float] = time.monotonic):
        self._bucket = bucket
        self._clock = clock

    async def __call__(
        self, make_request: NextRequestMiddlewareType[Any], bot: Bot, method: Any
    ) -> Any:
        wait = self._bucket.reserve(self._clock())
        if wait > 0:
            await asyncio.sleep(wait)
        return await make_request(bot, method)


def make_bot(settings: GatewaySettings) -> Bot:
    """A bot that sends HTML (see ``dexorder.gateway.pure.telegram_format``), its calls
    paced by one token bucket; the caller closes its session
    (``await bot.session.close()``)."""
    if settings.telegram_bot_token is None:
        raise TelegramNotConfigured(f"{env_name('telegram_bot_token')} is not set")
    session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
    rate = settings.telegram_calls_per_second
    # A burst of a fifth of a second's calls: no one-second window sees more than 1.2 times the rate.
    burst = max(1.0, rate / 5)
    session.middleware(BotRateLimit(TokenBucket(rate, burst, time.monotonic())))
    return Bot(
        settings.telegram_bot_token.get_secret_value(),
        session=session,
        default=DefaultBotProperties(parse_mode=ParseMode.HTML, link_preview_is_disabled=True),
    )


def webhook_url(settings: GatewaySettings) -> str:
    if settings.public_url is None:
        raise TelegramNotConfigured(
            f"{env_name('public_url')} is needed to tell Telegram where the webhook is"
        )
    return settings.public_url.rstrip("/") + WEBHOOK_PATH
