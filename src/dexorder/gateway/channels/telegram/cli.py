"""``dexorder-gateway set-webhook``: register the webhook URL and secret with the Bot API."""

from __future__ import annotations

from dexorder.gateway.settings import GatewaySettings


def set_webhook(settings: GatewaySettings) -> int:
    raise SystemExit("dexorder-gateway set-webhook: not built yet")
