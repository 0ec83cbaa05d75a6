"""One chat message through a gateway's WebSocket, read until its reply ends: what the
end-to-end suites on a cluster (kind, and the real node in tests/cluster) send."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def chat_frames(
    url: str, token: str, content: str, receive_timeout: float = 300
) -> list[dict[str, Any]]:
    """Every frame from connecting to the reply's ``done`` or ``error``, in order."""
    frames: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientWSTimeout(ws_receive=receive_timeout),
        ) as socket,
    ):
        await socket.send_json({"type": "message", "content": content})
        async for message in socket:
            frame = json.loads(message.data)
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                break
    return frames
