"""The Telegram channel: ``POST /webhook/telegram`` through aiogram, with account linking."""

from __future__ import annotations

from aiohttp import web


def install(app: web.Application) -> None:
    """Add the webhook and its workers to ``app`` when Telegram is configured."""
