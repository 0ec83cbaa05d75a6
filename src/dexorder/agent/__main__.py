"""``dexorder-agent``: one user's MCP server, configured from ``DEXORDER_AGENT_*``."""

from __future__ import annotations

import logging
import sys

import uvicorn

from dexorder.agent.app import build_app
from dexorder.agent.errors import StoreError
from dexorder.agent.mcp_server import quiet_sdk_request_log
from dexorder.agent.settings import AgentSettings, SettingsError, load_settings
from dexorder.agent.state import AgentState

logger = logging.getLogger("dexorder.agent")

EXIT_CONFIG = 2


def serve(settings: AgentSettings) -> None:
    token = settings.bearer_token()
    state = AgentState.open(settings.user_id, settings.data_dir)
    try:
        logger.info(
            "agent for user %s on %s:%d, data in %s (schema version %d)",
            settings.user_id,
            settings.host,
            settings.port,
            state.database.path,
            state.database.schema_version,
        )
        config = uvicorn.Config(
            build_app(state, token),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=3,
            # httptools and uvloop (the agent's extra has both) where installed, else h11 and
            # asyncio's loop. Every gateway turn is an MCP request or two here; h11's pure
            # Python parsing cost about a sixth of the agent's CPU per turn.
            http="auto",
            loop="auto",
        )
        uvicorn.Server(config).run()
    finally:
        state.close()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
        logging.getLogger().setLevel(settings.log_level.upper())
        quiet_sdk_request_log(settings.log_level)
        serve(settings)
    except (SettingsError, StoreError) as error:
        print(f"dexorder-agent: cannot start: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


if __name__ == "__main__":
    main()
