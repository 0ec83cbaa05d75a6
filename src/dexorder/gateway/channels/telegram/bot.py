"""The aiogram ``Bot`` of the gateway, pointed at ``telegram_api_url`` (a local server in tests)."""

from __future__ import annotations

from aiogram import Bot
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.enums import ParseMode

from dexorder.gateway.settings import GatewaySettings, env_name

WEBHOOK_PATH = "/webhook/telegram"


class TelegramNotConfigured(Exception):
    pass


def make_bot(settings: GatewaySettings) -> Bot:
    """A bot that sends HTML (see ``dexorder.gateway.pure.telegram_format``); the caller closes its
    session (``await bot.session.close()``)."""
    if settings.telegram_bot_token is None:
        raise TelegramNotConfigured(f"{env_name('telegram_bot_token')} is not set")
    session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_url))
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
