"""``dexorder chat``: a terminal client of the WebSocket protocol.

Streams replies, tool calls and status. Ctrl-C cancels the running generation;
a second Ctrl-C (or Ctrl-D at the prompt) quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

DEMO_DIR = Path.home() / ".local" / "share" / "dexorder" / "demo"


def render(frame: dict[str, Any]) -> str:
    """One frame as terminal text (pure, so it is tested without a terminal)."""
    kind = frame.get("type")
    if kind == "delta":
        return str(frame.get("content", ""))
    if kind == "status":
        return f"[{frame.get('stage')}] {frame.get('message')}\n"
    if kind == "ready":
        return f"connected as {frame.get('user')} ({frame.get('tier')}), session {frame.get('session_id')}\n"
    if kind == "tool_call":
        return f"\n→ {frame.get('name')}({json.dumps(frame.get('arguments'))})\n"
    if kind == "tool_result":
        content = str(frame.get("content", ""))
        head = content if len(content) < 300 else content[:300] + "…"
        return f"← {'error: ' if frame.get('is_error') else ''}{head}\n"
    if kind == "done":
        usage = frame.get("usage") or {}
        note = " (cancelled)" if frame.get("cancelled") else ""
        return f"\n[done{note}: {usage.get('total_tokens', 0)} tokens, {frame.get('model') or 'model'}]\n"
    if kind == "error":
        return f"\n[error {frame.get('code')}] {frame.get('message')}\n"
    return ""


async def _read_line(prompt: str) -> str | None:
    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            return None

    return await asyncio.to_thread(read)


async def chat(url: str, token: str) -> int:
    ws_url = url.rstrip("/").replace("http", "ws", 1) + "/ws/chat"
    loop = asyncio.get_running_loop()
    interrupts = 0
    pending: set[asyncio.Future[Any]] = set()
    turn_done = asyncio.Event()
    turn_done.set()
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": token}))

        def on_interrupt() -> None:
            nonlocal interrupts
            if not turn_done.is_set() and interrupts == 0:
                interrupts += 1
                pending.add(asyncio.ensure_future(ws.send_str(json.dumps({"type": "cancel"}))))
                sys.stdout.write("\n[cancelling — Ctrl-C again to quit]\n")
            else:
                pending.add(asyncio.ensure_future(ws.close()))

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, on_interrupt)

        async def reader() -> None:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(message.data)
                sys.stdout.write(render(frame))
                sys.stdout.flush()
                if frame.get("type") in ("done", "error"):
                    turn_done.set()

        reading = asyncio.create_task(reader())
        try:
            while not ws.closed:
                await turn_done.wait()
                line = await _read_line("you> ")
                if line is None or ws.closed:
                    break
                if not line.strip():
                    continue
                interrupts = 0
                turn_done.clear()
                await ws.send_str(json.dumps({"type": "message", "content": line}))
        finally:
            await ws.close()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    print("\nbye")
    return 0


def main(url: str | None, token: str | None) -> int:
    url = url or ((DEMO_DIR / "url").read_text().strip() if (DEMO_DIR / "url").exists() else None)
    token = token or (
        (DEMO_DIR / "token").read_text().strip() if (DEMO_DIR / "token").exists() else None
    )
    if not url or not token:
        print("dexorder chat: give --url and --token, or start `make demo` first", file=sys.stderr)
        return 2
    return asyncio.run(chat(url, token))
