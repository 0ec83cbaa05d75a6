"""Running the fake LLM beside synchronous code: in a thread, or as a child process."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal

from dexorder.devenv.fake_llm.scripts import SCRIPT_ADAPTER, Script
from dexorder.devenv.fake_llm.server import FAKE_API_KEY, FakeLLMServer
from dexorder.devenv.process import LOOPBACK, ManagedProcess, free_port, wait_until
from dexorder.devenv.service import Service
from dexorder.gateway.pure.routing import LLMTarget

# --- running it beside the tests, or as its own process ------------------------------------


class FakeLLMThread(Service):
    """The server on its own event loop in a daemon thread, for synchronous callers."""

    name = "fake-llm"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.server: FakeLLMServer | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-llm", daemon=True)
        self._thread.start()

        async def create() -> FakeLLMServer:
            server = FakeLLMServer(**self._options)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(create(), loop).result(timeout=30)

    def _stop_processes(self) -> None:
        loop, thread, server = self._loop, self._thread, self.server
        if loop is None or thread is None:
            return
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._loop = self._thread = self.server = None

    def describe(self) -> dict[str, str]:
        if self.server is None:
            return {}
        return {"url": self.server.base_url, "api_key": FAKE_API_KEY}


@dataclass(frozen=True)
class FakeLLMClient:
    """Scripts a running fake LLM over its HTTP control routes (``/_fake/...``), from any
    process: the one that started it, or a test that only knows where it listens."""

    root_url: str  # http://host:port, without /v1

    def call(self, method: str, path: str, payload: bytes | None = None) -> Any:
        request = urllib.request.Request(f"{self.root_url}{path}", data=payload, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    def requests(self) -> list[dict[str, Any]]:
        """Each recorded request's summary (see ``RecordedRequest.summary``)."""
        recorded: list[dict[str, Any]] = self.call("GET", "/_fake/requests")
        return recorded

    def queue(self, script: Script) -> None:
        self.call("POST", "/_fake/queue", SCRIPT_ADAPTER.dump_json(script))

    def set_script(self, model: str, script: Script) -> None:
        self.call("PUT", f"/_fake/scripts/{model}", SCRIPT_ADAPTER.dump_json(script))

    def reset(self) -> None:
        self.call("POST", "/_fake/reset", b"{}")


class FakeLLMProcess(Service):
    """The server as a child process: ``python -m dexorder.devenv.fake_llm``."""

    name = "fake-llm"

    def __init__(
        self,
        *,
        tokens_per_second: float | None = None,
        first_token_delay: float = 0.0,
        default: Literal["offline", "text"] = "offline",
        host: str = LOOPBACK,
    ) -> None:
        super().__init__()
        self.port = free_port()
        self.host = host
        self._argv = [sys.executable, "-m", "dexorder.devenv.fake_llm", "--port", str(self.port)]
        self._argv += ["--host", host]
        if tokens_per_second is not None:
            self._argv += ["--tokens-per-second", str(tokens_per_second)]
        self._argv += ["--first-token-delay", str(first_token_delay), "--default", default]
        self._process: ManagedProcess | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def target(self, model: str = "scripted") -> LLMTarget:
        return LLMTarget(model=f"openai/{model}", api_base=self.base_url, api_key=FAKE_API_KEY)

    def start(self) -> None:
        self._process = ManagedProcess(
            self.name, self._argv, log_path=self.data_dir / "fake-llm.log"
        ).start()
        wait_until(
            lambda: bool(self.client.call("GET", "/v1/models")),
            timeout=30,
            what="fake LLM server",
            process=self._process,
        )

    def _stop_processes(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def describe(self) -> dict[str, str]:
        return {"url": self.base_url, "api_key": FAKE_API_KEY}

    @property
    def client(self) -> FakeLLMClient:
        return FakeLLMClient(f"http://{self.host}:{self.port}")
