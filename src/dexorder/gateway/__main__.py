"""``dexorder-gateway``: serve the chat gateway, or run one of its admin commands.

dexorder-gateway [serve]     the HTTP and WebSocket server
dexorder-gateway migrate     apply the PostgreSQL migrations
dexorder-gateway set-webhook register the Telegram webhook URL and secret with the Bot API
dexorder-gateway rag ...     the knowledge base: `rag ingest PATH [--user U]`
dexorder-gateway mcp-credential USER_ID
                             the credential a user's own MCP server must accept
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys

from dexorder.gateway.settings import SettingsError, load_settings

YOUNG_GC_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation, once start-up is frozen."""


async def _freeze_heap(_: object) -> None:
    """Take what start-up loaded out of the cyclic garbage collector's sight.

    litellm, LangGraph and their pydantic schemas are millions of objects that live as long
    as the process. Each full collection walked them all, pausing the event loop, and every
    stream in it, for up to 400 ms (the gateway bench's relay p99 at 100 sessions). Frozen,
    they are still freed by reference counting; only the walk is spared.

    The youngest generation is then collected every 10,000 allocations instead of 700: the
    objects of a streamed token or a turn mostly die before that, so fewer collections move
    them on to be walked again (at 100 sessions: relay p99 2.3-2.5 ms against 2.6-4.5 ms,
    and 5 % less CPU per reply, over paired runs).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (the gateway's extra has it), else asyncio's own loop.

    Every streamed token is a socket read, a parse and a socket write on the event loop;
    uvloop's C loop and transports cut the gateway's CPU per reply by about a tenth and its
    relay tail at 100 sessions by about a third (BENCHMARKS.md, "The gateway").
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve() -> int:
    # Import-time work of litellm (a price list fetch) must never reach the internet.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from aiohttp import web

    from dexorder.gateway.app import create_app
    from dexorder.gateway.llm.adapter import load_litellm

    settings = load_settings()
    load_litellm()  # once, at start-up, not on the first message
    app = create_app(settings)
    app.on_startup.append(_freeze_heap)  # after the services' start-up (cleanup_ctx)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        # The drain (on_shutdown) has closed every socket by then; this is the handlers'
        # last moment before they are cancelled.
        shutdown_timeout=settings.drain_seconds + settings.ws_close_seconds + 1,
        access_log=None,
        print=lambda text: logging.getLogger("dexorder.gateway").info(text),
        loop=_new_event_loop(),
    )
    return 0


def _migrate() -> int:
    from dexorder.gateway.migrations import apply_migrations, describe_dsn

    settings = load_settings()
    applied = asyncio.run(apply_migrations(settings.database_url))
    names = ", ".join(m.name for m in applied) or "nothing new"
    print(f"migrated {describe_dsn(settings.database_url)}: {names}")
    return 0


def _mcp_credential(arguments: list[str]) -> int:
    from dexorder.gateway.pure.credentials import external_mcp_credential

    if len(arguments) != 1:
        print("usage: dexorder-gateway mcp-credential USER_ID", file=sys.stderr)
        return 2
    secret = load_settings().external_mcp_secret
    if secret is None:
        print("dexorder-gateway: DEXORDER_EXTERNAL_MCP_SECRET is not set", file=sys.stderr)
        return 2
    print(external_mcp_credential(secret.get_secret_value(), arguments[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="dexorder-gateway", description=__doc__)
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=["serve", "migrate", "set-webhook", "rag", "mcp-credential"],
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
            return _migrate()
        if args.command == "set-webhook":
            from dexorder.gateway.channels.telegram.cli import set_webhook

            return set_webhook(load_settings())
        if args.command == "rag":
            from dexorder.gateway.rag.cli import main as rag_main

            return rag_main(load_settings(), list(args.arguments))
        if args.command == "mcp-credential":
            return _mcp_credential(list(args.arguments))
        return _serve()
    except SettingsError as error:
        print(f"dexorder-gateway: bad configuration:\n  {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
