"""``dexorder chat``: a terminal client of the WebSocket protocol.

Streams replies, tool calls and status. Ctrl-C cancels the running generation; a second
Ctrl-C (or Ctrl-C or Ctrl-D at the prompt) quits.

Where the token comes from, first match wins: ``--token``; the running demo's token
file (``dexorder demo`` writes it); the gateway's demo token endpoint, which exists only
when the gateway runs in demo mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

DEMO_DIR = Path.home() / ".local" / "share" / "dexorder" / "demo"
PROMPT = "you> "


class ChatClientError(Exception):
    """The client cannot start: no gateway URL, no token, or the gateway refused it."""


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
    if kind == "sources":
        items = frame.get("items") or []
        return "".join(f"  source: {item.get('title') or item.get('source')}\n" for item in items)
    if kind == "approval_result":
        return f"\n[{frame.get('decision')}] {frame.get('message')}\n"
    if kind == "approval_request":
        return f"\n[approval requested] {frame.get('summary')} (not supported in the terminal; use the web page)\n"
    return ""


def ends_turn(frame: dict[str, Any]) -> bool:
    """Whether ``frame`` is the last one of the reply to a message."""
    return frame.get("type") in ("done", "error") and frame.get("code") != "bad_request"


def ws_url(url: str) -> str:
    """The chat socket's URL from a gateway's base URL (http, https, ws or wss)."""
    base = url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    elif not base.startswith(("ws://", "wss://")):
        raise ChatClientError(
            f"the gateway URL must start with http(s):// or ws(s)://, not {url!r}"
        )
    return base if base.endswith("/ws/chat") else base + "/ws/chat"


def http_url(url: str) -> str:
    """The gateway's HTTP base URL, from what the user gave (which may be the socket's)."""
    base = url.rstrip("/").removesuffix("/ws/chat")
    if base.startswith("wss://"):
        return "https://" + base.removeprefix("wss://")
    if base.startswith("ws://"):
        return "http://" + base.removeprefix("ws://")
    return base


@dataclass
class LineReader:
    """Whole lines from a terminal or pipe, read on the event loop (never in a thread, so a
    Ctrl-C at the prompt can end the program at once)."""

    fd: int
    lines: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    _buffer: bytes = b""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.fd, self._on_readable)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.fd)

    def _on_readable(self) -> None:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            if self._buffer:
                self.lines.put_nowait(self._buffer.decode(errors="replace"))
                self._buffer = b""
            self.lines.put_nowait(None)
            asyncio.get_running_loop().remove_reader(self.fd)
            return
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        for line in complete:
            self.lines.put_nowait(line.decode(errors="replace"))


class Session:
    """One chat over one socket: prompts, sends, prints what comes back."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, out: TextIO) -> None:
        self.ws = ws
        self.out = out
        self.generating = False
        self.cancel_sent = False
        self.quit = asyncio.Event()
        self.ready = asyncio.Event()
        self.at_prompt = False
        self.turn_over = asyncio.Event()
        self.turn_over.set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def on_interrupt(self) -> None:
        """Ctrl-C: cancel the reply if one runs and none was cancelled yet; else quit."""
        if self.generating and not self.cancel_sent:
            self.cancel_sent = True
            task = asyncio.ensure_future(self.ws.send_str(json.dumps({"type": "cancel"})))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.write("\n[cancelling: Ctrl-C again to quit]\n")
        else:
            self.quit.set()

    async def read_frames(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(message.data)
            text = render(frame)
            if self.at_prompt and text:
                # Status arriving while the prompt waits: print it above a fresh prompt.
                text = "\r\x1b[K" + text.lstrip("\n") + PROMPT
            self.write(text)
            if frame.get("type") == "ready":
                self.ready.set()
            if self.generating and ends_turn(frame):
                self.generating = False
                self.turn_over.set()
        code = self.ws.close_code
        if not self.quit.is_set():
            self.write(f"\n[the gateway closed the connection: {code}]\n")
        self.quit.set()

    async def converse(self, reader: LineReader) -> None:
        await _first(self.ready.wait(), self.quit.wait())
        while not self.quit.is_set():
            await _first(self.turn_over.wait(), self.quit.wait())
            if self.quit.is_set():
                return
            self.write(PROMPT)
            self.at_prompt = True
            line = await _first(reader.lines.get(), self.quit.wait())
            self.at_prompt = False
            if self.quit.is_set() or line is None or not isinstance(line, str):
                self.quit.set()
                return
            if not line.strip():
                continue
            self.generating = True
            self.cancel_sent = False
            self.turn_over.clear()
            await self.ws.send_str(json.dumps({"type": "message", "content": line}))


async def _first(*awaitables: Any) -> Any:
    """The result of whichever awaitable finishes first; the others are cancelled."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def chat(url: str, token: str, *, stdin_fd: int = 0, out: TextIO = sys.stdout) -> int:
    loop = asyncio.get_running_loop()
    reader = LineReader(stdin_fd)
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(url)) as ws:
        await ws.send_str(json.dumps({"type": "auth", "token": token}))
        session = Session(ws, out)
        loop.add_signal_handler(signal.SIGINT, session.on_interrupt)
        reader.start(loop)
        reading = asyncio.create_task(session.read_frames())
        try:
            await session.converse(reader)
        finally:
            reader.stop(loop)
            loop.remove_signal_handler(signal.SIGINT)
            await ws.close()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    out.write("\nbye\n")
    out.flush()
    return 0


async def fetch_demo_token(url: str) -> str:
    """A token from a demo-mode gateway's dev-only endpoint."""
    endpoint = http_url(url) + "/api/demo-token"
    try:
        async with aiohttp.ClientSession() as http, http.post(endpoint) as response:
            if response.status == 404:
                raise ChatClientError(
                    f"{url} is not in demo mode (no {endpoint}); pass --token with a JWT"
                )
            response.raise_for_status()
            body = await response.json()
    except aiohttp.ClientError as error:
        raise ChatClientError(f"cannot reach {endpoint}: {error}") from error
    return str(body["token"])


def _demo_file(name: str, demo_dir: Path) -> str | None:
    path = demo_dir / name
    return path.read_text().strip() if path.exists() else None


async def _run(url: str | None, token: str | None, demo_dir: Path) -> int:
    demo_url = _demo_file("url", demo_dir)
    url = url or demo_url
    if not url:
        raise ChatClientError("give --url (and --token), or start `dexorder demo` first")
    if token is None and demo_url is not None and http_url(url) == http_url(demo_url):
        token = _demo_file("token", demo_dir)
    if token is None:
        token = await fetch_demo_token(url)
    return await chat(url, token)


def main(url: str | None, token: str | None, demo_dir: Path = DEMO_DIR) -> int:
    try:
        return asyncio.run(_run(url, token, demo_dir))
    except ChatClientError as error:
        print(f"dexorder chat: {error}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as error:
        print(f"dexorder chat: cannot connect: {error}", file=sys.stderr)
        return 1
