"""One gateway replica with the Telegram channel's test tuning (a short claim time), run as
``python -m tests.integration.gateway.telegram.replica`` and configured by its environment."""

from __future__ import annotations

import logging
import os

from dexorder.gateway.channels.telegram import TELEGRAM_OPTIONS, TelegramOptions
from dexorder.gateway.channels.telegram.inbox import InboxOptions

FAST = TelegramOptions(inbox=InboxOptions(claim_idle_seconds=2.0, block_ms=200))


def main() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from aiohttp import web

    from dexorder.gateway.app import create_app
    from dexorder.gateway.llm.adapter import load_litellm
    from dexorder.gateway.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings(env_file=None)
    load_litellm()
    app = create_app(settings)
    app[TELEGRAM_OPTIONS] = FAST
    web.run_app(app, host=settings.host, port=settings.port, shutdown_timeout=5, print=None)


if __name__ == "__main__":
    main()
