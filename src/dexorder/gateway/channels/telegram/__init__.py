"""The Telegram channel: ``POST /webhook/telegram`` through aiogram, with account linking.

Installed only when ``TELEGRAM_BOT_TOKEN`` (and its webhook secret) are set. It adds:

- ``POST /webhook/telegram``: the secret checked in constant time, each update persisted
  (a Redis stream with a consumer group, or in memory without ``REDIS_URL``) before 200;
- ``POST /api/link-codes``: a single-use linking code for the bearer token's user;
- workers that process updates (``chat.TelegramChat``), a janitor that closes idle
  conversations, and, with Redis, a listener that carries ``/stop`` and ``/new`` to the
  replica whose worker is writing the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiogram.exceptions import TelegramAPIError
from aiohttp import web

from dexorder.gateway.channels.telegram.bot import WEBHOOK_PATH, make_bot
from dexorder.gateway.channels.telegram.chat import SessionDirectory, TelegramChat, chat_key
from dexorder.gateway.channels.telegram.inbox import Inbox, InboxOptions, MemoryInbox, RedisInbox
from dexorder.gateway.channels.telegram.reply import Pace
from dexorder.gateway.channels.telegram.urgent import UrgentLane
from dexorder.gateway.channels.telegram.webhook import INBOX, URGENT, WEBHOOK_SECRET, receive
from dexorder.gateway.control_bus import ControlBus
from dexorder.gateway.linking import (
    LINK_CODES,
    LINK_ISSUES,
    AttemptLimiter,
    LinkCodeStore,
    MemoryAttemptLimiter,
    RedisAttemptLimiter,
    create_link_code,
)
from dexorder.gateway.state import CHAT_SERVICES, DB_POOL, HEALTH, REDIS, SETTINGS

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "dexorder:telegram:control"
LINK_CODES_PATH = "/api/link-codes"


@dataclass(frozen=True)
class TelegramOptions:
    """Tuning that is not configuration: defaults for production, shorter in tests."""

    inbox: InboxOptions = field(default_factory=InboxOptions)
    pace: Pace = field(default_factory=Pace)
    janitor_seconds: float = 60.0


TELEGRAM_OPTIONS = web.AppKey("telegram_options", TelegramOptions)
TELEGRAM_CHAT = web.AppKey("telegram_chat", TelegramChat)


def install(app: web.Application) -> None:
    """Add the webhook and its workers to ``app`` when Telegram is configured."""
    settings = app[SETTINGS]
    if settings.telegram_bot_token is None or settings.telegram_webhook_secret is None:
        return
    app[WEBHOOK_SECRET] = settings.telegram_webhook_secret.get_secret_value().encode()
    app.router.add_post(WEBHOOK_PATH, receive)
    app.router.add_post(LINK_CODES_PATH, create_link_code)
    app.cleanup_ctx.append(_telegram)


async def _telegram(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    options = app.get(TELEGRAM_OPTIONS) or TelegramOptions()
    async with contextlib.AsyncExitStack() as stack:
        bot = make_bot(settings)
        stack.push_async_callback(bot.session.close)
        # The app's shared services (opened first) own the database pool and Redis client.
        app[LINK_CODES] = LinkCodeStore(app[DB_POOL], settings.link_code_ttl_seconds)
        # Names this replica on the control channel, so it skips its own commands' echo.
        replica = uuid.uuid4().hex
        redis = app.get(REDIS)
        control = ControlBus(redis, CONTROL_CHANNEL, replica) if redis is not None else None
        inbox: Inbox
        attempts: AttemptLimiter
        if redis is not None:
            inbox = RedisInbox(redis, options.inbox)
            attempts = RedisAttemptLimiter(redis)
            app[LINK_ISSUES] = RedisAttemptLimiter(redis)
            log.info("Telegram updates: durable in a Redis stream, shared by every replica")
        else:
            inbox, attempts = MemoryInbox(options.inbox), MemoryAttemptLimiter()
            app[LINK_ISSUES] = MemoryAttemptLimiter()
            log.info(
                "Telegram updates: no REDIS_URL, so they are queued in this process only and "
                "are lost if it stops (repeated update ids are still dropped)"
            )
        app[INBOX] = inbox
        app[HEALTH].append(("telegram_inbox", inbox.healthy))
        chat = TelegramChat(
            bot=bot,
            services=app[CHAT_SERVICES],
            link_codes=app[LINK_CODES],
            attempts=attempts,
            sessions=SessionDirectory(redis, settings.session_ttl_seconds),
            pace=options.pace,
            idle_seconds=settings.session_ttl_seconds,
            broadcast=_publisher(control) if control is not None else None,
        )
        app[TELEGRAM_CHAT] = chat
        stack.push_async_callback(chat.close)
        # /stop at once, beside the inbox's workers (closed before the chat is).
        app[URGENT] = UrgentLane(chat.handle)
        stack.push_async_callback(app[URGENT].close)
        try:
            await chat.start()
        except TelegramAPIError as error:
            # Not fatal: only group mentions need the bot's name, and it is fetched again.
            log.warning("Telegram getMe failed at start: %s", error)
        tasks = [
            asyncio.create_task(
                inbox.run(chat.handle, chat.give_up, chat_key), name="telegram-inbox"
            ),
            asyncio.create_task(_janitor(chat, options.janitor_seconds), name="telegram-janitor"),
        ]
        if control is not None:
            tasks.append(
                asyncio.create_task(control.listen(_applier(chat)), name="telegram-control")
            )
        try:
            yield
        finally:
            inbox.stop()
            # The inbox returns within one blocking read; then everything is cancelled.
            await asyncio.wait(tasks[:1], timeout=options.inbox.block_ms / 1000 + 5)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    log.error("Telegram task %s failed", task.get_name(), exc_info=task.exception())


# ``/stop`` and ``/new`` go to the replica that holds the conversation; a chat is
# ``chat_id:user_id`` on the control channel.


def _publisher(control: ControlBus) -> Callable[[str, int, int], Awaitable[None]]:
    async def publish(action: str, chat_id: int, user_id: int) -> None:
        await control.publish(action, f"{chat_id}:{user_id}")

    return publish


def _applier(chat: TelegramChat) -> Callable[[str, str], Awaitable[None]]:
    async def apply(action: str, target: str) -> None:
        chat_id, user_id = target.split(":")
        await chat.control(action, int(chat_id), int(user_id))

    return apply


async def _janitor(chat: TelegramChat, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        closed = await chat.close_idle()
        if closed:
            log.info("closed %d idle Telegram conversations", closed)


__all__ = ["TELEGRAM_CHAT", "TELEGRAM_OPTIONS", "TelegramOptions", "install"]
