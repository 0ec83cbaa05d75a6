"""`dexorder demo` as a newcomer runs it: the working tree copied to a clean directory, a
fresh virtual environment with the checkout installed, then the demo answers a chat
message within its time budget, serves the page, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from dexorder.devenv.process import free_port, tcp_answers, wait_until
from tests.e2e.quickstart import (
    copy_checkout,
    demo_process,
    fresh_venv,
)

pytestmark = pytest.mark.slow

# `dexorder demo` to "is up": PostgreSQL, then the gateway importing litellm, on a busy 2-core
# machine (about 20 s when it is quiet).
UP_BUDGET_SECONDS = 150.0
REPLY_BUDGET_SECONDS = 60.0  # from the first message to `done`, provisioning the agent included


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "dexorder"
    copy_checkout(root)
    fresh_venv(root)
    return root


@pytest.fixture
def demo(checkout: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    state = tmp_path / "state"
    log = tmp_path / "demo.log"
    port = free_port()
    argv = [str(checkout / ".venv" / "bin" / "dexorder"), "demo", "--port", str(port)]
    with demo_process([*argv, "--state-dir", str(state)], log, cwd=checkout) as process:
        yield process, state, log


def processes_running(checkout: Path) -> dict[int, str]:
    """Processes whose command line names ``checkout`` (its environment's Python), by pid."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if str(checkout) in command:
            found[int(entry.name)] = command
    return found


def database_port(processes: dict[int, str]) -> int:
    """PostgreSQL's port, from the gateway's DATABASE_URL."""
    for pid, command in processes.items():
        if "dexorder.gateway" in command:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            [url] = [
                item[len(b"DATABASE_URL=") :]
                for item in environ
                if item.startswith(b"DATABASE_URL=")
            ]
            return int(urlsplit(url.decode()).port or 0)
    raise AssertionError(f"no gateway among {processes}")


async def chat_once(url: str, token: str, text: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url.replace("http", "ws", 1) + "/ws/chat") as ws,
    ):
        await ws.send_str(json.dumps({"type": "auth", "token": token}))
        await ws.send_str(json.dumps({"type": "message", "content": text}))
        async for message in ws:
            frame = json.loads(message.data)
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                break
    return frames


def test_demo_from_a_clean_checkout_answers_and_stops(
    demo: tuple[subprocess.Popen[bytes], Path, Path], checkout: Path
) -> None:
    process, state, log = demo
    started = time.monotonic()

    def is_up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited with {process.returncode}:\n{log.read_text()}")
        return "Dexorder demo is up" in log.read_text()

    wait_until(is_up, timeout=UP_BUDGET_SECONDS, what="the demo")
    up_seconds = time.monotonic() - started
    output = log.read_text()
    assert "OFFLINE SCRIPTED model" in output
    assert "Redis and Kafka are not configured" in output
    url = (state / "url").read_text().strip()
    token = (state / "token").read_text().strip()
    assert f"Open the chat:  {url}/" in output

    with urllib.request.urlopen(url + "/api/info", timeout=10) as response:
        assert json.loads(response.read())["offline"] is True

    asked = time.monotonic()
    frames = asyncio.run(chat_once(url, token, "what is the RSI of my prices?"))
    reply_seconds = time.monotonic() - asked
    kinds = [frame["type"] for frame in frames]
    assert kinds[-1] == "done", frames
    assert "tool_call" in kinds
    text = "".join(frame["content"] for frame in frames if frame["type"] == "delta")
    assert "[offline scripted model]" in text
    assert reply_seconds < REPLY_BUDGET_SECONDS
    print(f"demo up in {up_seconds:.1f} s; first reply in {reply_seconds:.1f} s")

    # Ctrl-C stops everything: the demo exits 0, and nothing it started is left: no process
    # of its environment (gateway, agent, model server), and no PostgreSQL on its port.
    children = processes_running(checkout)
    assert len(children) >= 3, children  # the demo, its gateway, the offline model server
    postgres_port = database_port(children)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, log.read_text()
    assert "stopped." in log.read_text()
    assert not processes_running(checkout)
    assert not tcp_answers(postgres_port)
    assert not (state / "token").exists()
