"""``POST /webhook/telegram``: check Telegram's secret, persist the update, answer 200."""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from dexorder.gateway.channels.telegram.inbox import Inbox, InboxUnavailable
from dexorder.gateway.channels.telegram.urgent import UrgentLane

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_UPDATE_BYTES = 1 << 20

WEBHOOK_SECRET = web.AppKey("telegram_webhook_secret", bytes)
INBOX: web.AppKey[Inbox] = web.AppKey("telegram_inbox")
URGENT = web.AppKey("telegram_urgent", UrgentLane)


async def receive(request: web.Request) -> web.Response:
    given = request.headers.get(SECRET_HEADER, "").encode()
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    if not hmac.compare_digest(given, request.app[WEBHOOK_SECRET]):
        raise web.HTTPForbidden(text="forbidden")
    if request.content_length is not None and request.content_length > MAX_UPDATE_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_UPDATE_BYTES, actual_size=request.content_length
        )
    body = await request.read()
    try:
        update = json.loads(body)
        update_id = update["update_id"]
    except (ValueError, TypeError, KeyError) as error:
        raise web.HTTPBadRequest(text="expected a Telegram update with an update_id") from error
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise web.HTTPBadRequest(text="update_id must be an integer")
    inbox, urgent = request.app[INBOX], request.app.get(URGENT)
    try:
        if urgent is not None and urgent.takes(update):
            # Not queued behind the replies it is meant to stop (see ``urgent``).
            if await inbox.mark_done(update_id):
                urgent.run(update_id, body)
        else:
            # Persisted before the 200: once Telegram hears OK it never sends it again.
            await inbox.put(update_id, body)
    except InboxUnavailable as error:
        raise web.HTTPServiceUnavailable(text="try again") from error
    return web.Response(status=200)
