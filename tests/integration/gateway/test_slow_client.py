"""A client that stops reading: its socket is cut off, its reply goes on and is resumable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from dexorder.devenv.fake_llm import FakeLLMServer, TextScript
from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.gateway.channels.resume import detached_conversations
from tests.integration.gateway.conftest import (
    RunningGateway,
    connect,
    gateway_settings,
    reply_text,
    serve_gateway,
)
from tests.integration.gateway.raw_socket import RawChat

# Far more than the kernel's buffers on both ends of a loopback connection hold.
LONG_REPLY = " ".join(f"{index:05d}" + "x" * 994 for index in range(4000))
SEND_TIMEOUT = 2.0


@pytest.fixture
async def impatient_gateway(
    migrated_dsn: str, issuer: LocalJwksIssuer, llm: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    settings = gateway_settings(
        migrated_dsn,
        issuer,
        llm,
        tmp_path,
        ws_send_timeout_seconds=SEND_TIMEOUT,
        resume_buffer_bytes=8 << 20,
        # Queued frames never reach the cap here: the send timeout is what cuts it off.
        ws_send_buffer_bytes=64 << 20,
    )
    async with serve_gateway(settings) as running:
        yield running


# The reply's write-back to the agent is a body over 1 MiB (which the agent refuses, logged).
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")
async def test_a_client_that_never_reads_is_cut_off_and_its_reply_is_resumable(
    impatient_gateway: RunningGateway, issuer: LocalJwksIssuer, llm: FakeLLMServer, user_id: str
) -> None:
    gateway = impatient_gateway
    port = urlsplit(gateway.url).port
    assert port is not None
    token = issuer.mint(user_id)
    llm.queue(TextScript(text=LONG_REPLY, tokens_per_second=5000))
    stalled = await asyncio.to_thread(RawChat, port, token)
    try:
        ready = await asyncio.to_thread(stalled.read_frame)
        assert ready["type"] == "ready"
        session_id = ready["session_id"]
        await asyncio.to_thread(stalled.send, {"type": "message", "content": "say a lot"})
        # From here on it reads nothing: it is cut off, its conversation waits detached for
        # a resume, and the reply goes on without it, to its end.
        # Well before the heartbeat (a ping every 30 s) would notice anything.
        async with asyncio.timeout(SEND_TIMEOUT + 20):
            while not detached_conversations(gateway.app):  # noqa: ASYNC110 - another app's state
                await asyncio.sleep(0.1)
        assert await asyncio.to_thread(stalled.cut_off, 30)
        async with aiohttp.ClientSession() as http:
            resumed = await connect(
                http, gateway, token, query=f"?session={session_id}&after={ready['last_seq']}"
            )
            frames = await resumed.until("done", timeout=60)
            assert reply_text(frames) == LONG_REPLY
            await resumed.ws.close()
    finally:
        stalled.close()
