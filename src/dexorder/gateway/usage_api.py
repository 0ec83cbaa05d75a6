"""``GET /api/usage``: a user's own usage, for the web page or any client with their JWT.

Answers with the tier's limits as they apply to the user, today's tokens against the
daily budget, and the daily totals of the last ``days`` days (default 30, at most 90).
"""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from dexorder.gateway.bearer import request_identity
from dexorder.gateway.conversation import ConversationError, effective_license
from dexorder.gateway.state import CHAT_SERVICES
from dexorder.gateway.stores.limits import LimiterUnavailable
from dexorder.gateway.stores.usage import UsageUnavailable

USAGE_PATH = "/api/usage"
DEFAULT_DAYS = 30
MAX_DAYS = 90


def _days(request: web.Request) -> int:
    text = request.query.get("days", str(DEFAULT_DAYS))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_DAYS:
        raise web.HTTPBadRequest(text=f"days must be a whole number from 1 to {MAX_DAYS}")
    return int(text)


def _unavailable(message: str) -> web.Response:
    return web.json_response({"error": "service_unavailable", "message": message}, status=503)


async def get_usage(request: web.Request) -> web.Response:
    identity = await request_identity(request)
    days = _days(request)
    services = request.app[CHAT_SERVICES]
    try:
        license = await effective_license(services, identity.user, identity.email)
    except ConversationError as error:
        status = 403 if error.code.value == "license_refused" else 503
        return web.json_response(
            {"error": error.code.value, "message": error.message}, status=status
        )
    today = dt.datetime.now(dt.UTC).date()
    store = None if services.usage is None else services.usage.store
    try:
        totals = (
            []
            if store is None
            else await store.daily(identity.user, today - dt.timedelta(days=days - 1), today)
        )
    except UsageUnavailable:
        return _unavailable("usage cannot be read right now; try again shortly")
    try:
        used_today: int | None = await services.limiter.tokens_today(identity.user)
    except LimiterUnavailable:
        used_today = None
    budget = license.rate_limits.tokens_per_day
    return web.json_response(
        {
            "user": identity.user,
            "tier": license.tier.name,
            "limits": license.rate_limits.model_dump(),
            "today": {
                "day": today.isoformat(),
                "tokens_used": used_today,
                "tokens_remaining": None if used_today is None else max(0, budget - used_today),
            },
            "days": [
                {
                    "day": total.day.isoformat(),
                    "prompt_tokens": total.prompt_tokens,
                    "completion_tokens": total.completion_tokens,
                    "messages": total.messages,
                }
                for total in totals
            ],
        }
    )
