"""``python -m dexorder.devenv.fake_llm --port N``: the fake LLM as its own process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Mapping, Sequence
from typing import Final

from dexorder.devenv.fake_llm.scripts import OFFLINE_LABEL, OfflineScript, Script, TextScript
from dexorder.devenv.fake_llm.server import FakeLLMServer

DEFAULT_SCRIPTS: Final[Mapping[str, Script]] = {
    "offline": OfflineScript(),
    "text": TextScript(text="Hello from the scripted model. It streams one word at a time."),
}


async def serve(port: int, options: argparse.Namespace) -> None:
    server = FakeLLMServer(
        port=port,
        host=options.host,
        default=DEFAULT_SCRIPTS[options.default],
        scripts={"offline": OfflineScript()},
        tokens_per_second=options.tokens_per_second,
        first_token_delay=options.first_token_delay,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    print(f"{OFFLINE_LABEL} OpenAI-compatible server on {server.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible chat server.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--tokens-per-second", type=float, default=None)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--default", choices=sorted(DEFAULT_SCRIPTS), default="offline")
    options = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(options.port, options))


if __name__ == "__main__":
    main()
