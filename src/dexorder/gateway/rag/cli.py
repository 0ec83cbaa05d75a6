"""``dexorder-gateway rag ...``: ingest documents into the knowledge base."""

from __future__ import annotations

from dexorder.gateway.settings import GatewaySettings


def main(settings: GatewaySettings, argv: list[str]) -> int:
    raise SystemExit("dexorder-gateway rag: not built yet")
