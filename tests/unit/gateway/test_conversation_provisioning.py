"""A conversation gets its agent for the first message, never for being opened: a script
that opens sockets and sends nothing makes no pod and no volume (issue 21, item 3)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any, cast

from dexorder.core.tiers import parse_tier_catalog
from dexorder.gateway.agent_handle import AgentHandle
from dexorder.gateway.conversation import Conversation, TurnSetup
from dexorder.gateway.llm.routing import ModelRouter
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.licenses import License, resolve_license
from dexorder.gateway.stores.limits import Limiter

REPO = Path(__file__).parents[3]


class CountingAgent:
    """An agent handle that counts ``ensure`` calls and never gets an agent."""

    def __init__(self) -> None:
        self.ensured = asyncio.Event()
        self.calls = 0

    async def ensure(self, progress: Any) -> Any:
        self.calls += 1
        self.ensured.set()
        await asyncio.Event().wait()  # provisioning that never ends: the test stops here

    def closing(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_the_agent_is_ensured_for_the_first_message_not_on_start() -> None:
    catalog = parse_tier_catalog((REPO / "config" / "tiers.yaml").read_text())
    license = resolve_license(
        License(user_id="auth0|alice", tier="free"), catalog, dt.datetime.now(dt.UTC)
    )
    agent = CountingAgent()

    async def emit(frame: protocol.Frame) -> None:
        pass

    conversation = Conversation(
        license,
        agent=cast(AgentHandle, agent),
        turns=TurnSetup(router=cast(ModelRouter, None)),
        limiter=cast(Limiter, None),
        usage=None,
        max_queued=4,
        session_id="s" * 8,
        emit=emit,
        show=cast(Any, emit),
        channel="websocket",
    )
    conversation.start()
    try:
        for _ in range(10):  # let the worker run as far as it goes without a message
            await asyncio.sleep(0)
        assert agent.calls == 0
        assert conversation.submit("hello")
        async with asyncio.timeout(10):
            await agent.ensured.wait()
        assert agent.calls == 1
    finally:
        await conversation.close()
