"""What the gateway adds to a streamed reply, against reading the model directly.

    .venv/bin/python bench/bench_gateway.py                # 1, 100 and 1,000 sessions
    .venv/bin/python bench/bench_gateway.py --levels 1 100 --idle 200 --out /tmp/x.md

Everything is real and on loopback: PostgreSQL, a JWKS issuer, the ``dexorder-gateway``
process (local provisioner, its warm agent process), and a model server that streams at a
fixed token rate. Each token the model server sends carries two ``time.monotonic()``
stamps, when the request arrived and when the token left (CLOCK_MONOTONIC is one clock for
every process on the machine), so a reader knows, for each token:

- relay delay: its arrival minus its departure from the model server;
- added first-token latency: (first token's arrival - the message's send) minus the model
  server's own time to first token (first departure - request arrival).

The same stream is read three ways in one run, at the same concurrency: through the gateway
(a WebSocket chat session per reader), with litellm's SDK directly (``acompletion``,
streamed), and with a raw aiohttp SSE reader (the floor). Idle RSS is the gateway process's
VmRSS with N authenticated, ready, idle sessions, minus before, over N.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from dexorder.devenv.jwks import LocalJwksIssuer
from dexorder.devenv.paths import TIER_CATALOG
from dexorder.devenv.postgres import PostgresService
from dexorder.devenv.process import ManagedProcess, free_port, wait_until
from dexorder.devenv.redis import RedisService
from dexorder.gateway.pure.licenses import License, LicenseLimits, RateLimitOverrides

ISSUER = "https://id.bench.dexorder"
AUDIENCE = "dexorder-gateway"
API_KEY = "bench-key"
USER = "bench-user"

# --- the model server: a fixed token rate, each token stamped -------------------------------


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def model_server_app(rate: float, tokens: int) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        model = str(body.get("model", "bench"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # Every chunk but the first is this one with another stamp: encoded once, so the
        # model server, which shares this machine's cores with the gateway, costs little.
        head, tail = _sse(_chunk(model, {"content": "\0"}, None)).split(b"\\u0000")
        for index in range(tokens):
            wait = arrived + index / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            stamp = f"{arrived:.6f}:{time.monotonic():.6f}|"
            if index == 0:
                await response.write(
                    _sse(_chunk(model, {"role": "assistant", "content": stamp}, None))
                )
            else:
                await response.write(head + stamp.encode() + tail)
        await response.write(_sse(_chunk(model, {}, "stop")))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}
            await response.write(_sse({**_chunk(model, {}, None), "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    return app


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The bench's own loops (model server, client): uvloop unless asked otherwise."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def serve_model(port: int, rate: float, tokens: int, loop: str) -> None:
    app = model_server_app(rate, tokens)
    # What this module imports (pydantic, dexorder's models) is a heap that a full
    # collection walked for 40-50 ms, with every stream stalled; the tokens then left in
    # one burst, and the gateway's queue behind two such bursts held over half of one
    # run's top 1 %. The gateway freezes its own start-up heap the same way.
    gc.freeze()
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        print=None,
        loop=new_event_loop(loop),
    )


# --- samples --------------------------------------------------------------------------------


@dataclass
class Samples:
    added_first_token: list[float] = field(default_factory=list)
    relay: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)


class StreamReader:
    """Turns stamped text into samples, whatever way it was chunked."""

    def __init__(self, samples: Samples, sent_at: float) -> None:
        self._samples = samples
        self._sent_at = sent_at
        self._pending = ""
        self._first = True

    def feed(self, text: str, arrived: float) -> None:
        self._pending += text
        *complete, self._pending = self._pending.split("|")
        for stamp in complete:
            request_arrived, token_left = (float(part) for part in stamp.split(":"))
            self._samples.relay.append(arrived - token_left)
            if self._first:
                self._first = False
                own_first_token = token_left - request_arrived
                self._samples.added_first_token.append((arrived - self._sent_at) - own_first_token)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def agents_under(root: Path) -> list[int]:
    """The pids of agent processes whose data directory is under ``root``."""
    marker = f"DEXORDER_AGENT_DATA_DIR={root}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environment = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(marker) for entry in environment):
            pids.append(int(proc.name))
    return pids


def stop_agents_under(root: Path) -> None:
    """SIGKILL agent processes whose data directory is under ``root``."""
    for pid in agents_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this machine's vCPUs wanted it.

    On a shared host this is the noise no process here controls: the same code's relay
    p99 moves by milliseconds when it rises, so the report gives it beside each figure."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --- the three readers ----------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "stream please"}]


async def read_raw(http: aiohttp.ClientSession, base_url: str, samples: Samples) -> None:
    sent = time.monotonic()
    reader = StreamReader(samples, sent)
    payload = {"model": "bench", "messages": MESSAGES, "stream": True}
    async with http.post(
        f"{base_url}/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as response:
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            arrived = time.monotonic()
            for choice in json.loads(line[6:])["choices"]:
                content = choice["delta"].get("content")
                if content:
                    reader.feed(content, arrived)


async def read_litellm(litellm: Any, base_url: str, samples: Samples) -> None:
    sent = time.monotonic()
    reader = StreamReader(samples, sent)
    stream = await litellm.acompletion(
        model="openai/bench",
        api_base=base_url,
        api_key=API_KEY,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        arrived = time.monotonic()
        for choice in chunk.choices:
            content = choice.delta.content
            if content:
                reader.feed(content, arrived)


class ChatSession:
    """One chat socket, read all the time (as a browser does, which also answers pings).

    A turn's ``delta`` frames are fed to its reader as they arrive, in the socket's reader
    task; other frames go through a queue. A queue hop and a ``wait_for`` per token cost
    this client about a millisecond of CPU per reply, on cores the gateway shares.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._frames: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()
        self._stream: StreamReader | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    arrived = time.monotonic()
                    frame = json.loads(message.data)
                    if self._stream is not None and frame["type"] == "delta":
                        self._stream.feed(frame["content"], arrived)
                    else:
                        self._frames.put_nowait((arrived, frame))
        finally:
            self._frames.put_nowait((time.monotonic(), None))

    async def next(self) -> tuple[float, dict[str, Any]]:
        arrived, frame = await asyncio.wait_for(self._frames.get(), timeout=300)
        if frame is None:
            raise RuntimeError(f"the gateway closed the session ({self.ws.close_code})")
        return arrived, frame

    async def until(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            _, frame = await self.next()
            if wanted(frame):
                return frame

    async def turn(self, samples: Samples | None) -> None:
        sent = time.monotonic()
        self._stream = StreamReader(samples or Samples(), sent)
        try:
            await self.ws.send_str(json.dumps({"type": "message", "content": "stream please"}))
            while True:
                _, frame = await self.next()
                if frame["type"] == "done":
                    return
                if frame["type"] == "error":
                    if samples is not None:
                        samples.failures += 1
                        samples.errors.append(f"{frame.get('code')}: {frame.get('message')}")
                    return
        finally:
            self._stream = None

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


class SessionPool:
    """Hands each concurrent turn a session of its own."""

    def __init__(self, sessions: list[ChatSession]) -> None:
        self._free = list(sessions)

    async def turn(self, samples: Samples) -> None:
        session = self._free.pop()
        try:
            await session.turn(samples)
        finally:
            self._free.append(session)


async def open_sessions(
    http: aiohttp.ClientSession, ws_url: str, token: str, count: int
) -> list[ChatSession]:
    async def one() -> ChatSession:
        ws = await http.ws_connect(ws_url, headers={"Authorization": f"Bearer {token}"})
        session = ChatSession(ws)
        await session.until(lambda f: f["type"] == "ready")
        # The agent is provisioned for a conversation's first message (issue 21): each
        # session's warm turn gets it ready.
        return session

    sessions: list[ChatSession] = []
    for start in range(0, count, 100):  # in batches, as a fleet's clients arrive
        sessions += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return sessions


class StalledSession:
    """A chat socket that stops reading once its session is ready, and from then on sends a
    message every ``interval`` seconds (a reply's duration: it is always generating): its
    frames fill the kernel's buffers, then the gateway's writer, until the gateway cuts it
    off. What a client gone to sleep with a chat open does, or one behind a dead link."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    @classmethod
    async def open(cls, port: int, token: str) -> StalledSession:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"no upgrade: {head!r}")
        await reader.readuntil(b'"type":"ready"')
        writer.transport.pause_reading()  # and never again: the receive window shuts
        return cls(writer)

    def _send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self._writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    async def keep_asking(self, interval: float, stop: asyncio.Event) -> None:
        message = json.dumps({"type": "message", "content": "stream please"})
        while not stop.is_set() and not self._writer.transport.is_closing():
            self._send(message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    def close(self) -> None:
        self._writer.transport.abort()


def metric_total(metrics_url: str, name: str) -> float | None:
    """The sum of a counter's samples on the gateway's /metrics (None: the gateway has no
    such counter, as the code before issue 20 had no socket writer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:  # the code before issue 21 serves no metrics port
        return None
    if f"# TYPE {name} " not in text:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    )


@dataclass
class SlowRun:
    """The gateway path run again with stalled sessions beside it."""

    stalled: int
    normal: Samples
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    cut_off: float | None = None
    gateway_cpu: float = 0.0


async def run_with_stalled(
    stack: Stack,
    pool: SessionPool,
    level: Level,
    stalled: int,
    lead: float,
    spread: float,
) -> SlowRun:
    """The level's gateway rounds again, ``stalled`` stalled sessions asking all along
    (from ``lead`` seconds before the rounds, so their buffers are full and the gateway's
    writers hold their frames while the rounds run); the gateway's RSS sampled all along."""
    port = int(stack.gateway_url.rsplit(":", 1)[1])
    run = SlowRun(stalled, Samples(), rss_before_kib=rss_kib(stack.gateway_pid))
    cut_before = metric_total(stack.metrics_url, "dexorder_gateway_slow_clients_cut_off_total")
    run.rss_peak_kib = run.rss_before_kib
    done = asyncio.Event()

    async def sample_rss() -> None:
        while not done.is_set():
            run.rss_peak_kib = max(run.rss_peak_kib, rss_kib(stack.gateway_pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)

    sessions: list[StalledSession] = []
    for start in range(0, stalled, 50):
        sessions += await asyncio.gather(
            *(StalledSession.open(port, stack.token) for _ in range(min(50, stalled - start)))
        )
    sampler = asyncio.create_task(sample_rss())
    askers = [asyncio.create_task(s.keep_asking(spread or 0.8, done)) for s in sessions]
    try:
        await asyncio.sleep(lead)
        gateway_before = cpu_seconds([stack.gateway_pid])
        await run_rounds(level.sessions, level.rounds, pool.turn, run.normal, spread)
        run.gateway_cpu = cpu_seconds([stack.gateway_pid]) - gateway_before
    finally:
        done.set()
        await asyncio.gather(sampler, *askers)
        for session in sessions:
            session.close()
    cut_after = metric_total(stack.metrics_url, "dexorder_gateway_slow_clients_cut_off_total")
    if cut_after is not None:
        run.cut_off = cut_after - (cut_before or 0.0)
    # The stalled sessions' conversations linger detached for their grace (30 s), then close.
    await asyncio.sleep(35)
    run.rss_after_kib = rss_kib(stack.gateway_pid)
    return run


# --- the run ----------------------------------------------------------------------------------


def models_yaml(base_url: str) -> str:
    target = {"model": "openai/bench", "api_base": base_url, "api_key_env": "OPENAI_API_KEY"}
    groups = {group: [target] for group in ("fast", "standard", "deep")}
    return json.dumps({"default_group": "standard", "groups": groups})


@dataclass
class Stack:
    model_url: str
    model_pid: int
    gateway_url: str
    gateway_pid: int
    token: str
    agents_root: Path
    metrics_url: str


async def save_license(dsn: str) -> None:
    from dexorder.gateway.migrations import apply_migrations
    from dexorder.gateway.stores.licenses import LicenseStore, open_pool

    await apply_migrations(dsn)
    pool = await open_pool(dsn)
    try:
        unlimited = RateLimitOverrides(
            messages_per_minute=1_000_000,
            tokens_per_day=1_000_000_000,
            concurrent_generations=100_000,
        )
        await LicenseStore(pool, auto_enroll=False, cache_seconds=0).save_license(
            License(user_id=USER, tier="enterprise", limits=LicenseLimits(rate_limits=unlimited))
        )
    finally:
        await pool.close()


def gateway_process(
    workdir: Path,
    dsn: str,
    jwks_url: str,
    model_url: str,
    port: int,
    metrics_port: int,
    redis_url: str | None,
    gateway_src: Path | None,
) -> ManagedProcess:
    models = workdir / "models.yaml"
    models.write_text(models_yaml(model_url))
    env = {key: value for key, value in os.environ.items() if not key.startswith("DEXORDER_")}
    env.update(
        {
            "DATABASE_URL": dsn,
            "OPENAI_API_KEY": API_KEY,
            "DEXORDER_JWKS_URL": jwks_url,
            "DEXORDER_JWT_ISSUER": ISSUER,
            "DEXORDER_JWT_AUDIENCE": AUDIENCE,
            "DEXORDER_PROVISIONER": "local",
            "DEXORDER_LOCAL_AGENTS_DIR": str(workdir / "agents"),
            "DEXORDER_TIERS_PATH": str(TIER_CATALOG),
            "DEXORDER_MODELS_PATH": str(models),
            "DEXORDER_HOST": "127.0.0.1",
            "DEXORDER_PORT": str(port),
            "DEXORDER_DRAIN_SECONDS": "1",
            "DEXORDER_METRICS_PORT": str(metrics_port),
            # Every bench session is one user's (the code before issue 21 ignores this).
            "DEXORDER_MAX_SOCKETS_PER_USER": "1000",
        }
    )
    if gateway_src is not None:  # another tree's gateway (its code before a change)
        env["PYTHONPATH"] = str(gateway_src)
    if redis_url is not None:
        # Sessions (each frame recorded before it is sent) and limits in Redis, as with
        # many replicas.
        env["REDIS_URL"] = redis_url
    return ManagedProcess(
        "dexorder-gateway",
        [sys.executable, "-m", "dexorder.gateway", "serve"],
        log_path=workdir / "gateway.log",
        env=env,
        cwd=workdir,
    ).start()


def _answers(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@dataclass
class Level:
    sessions: int
    rounds: int
    paths: dict[str, Samples] = field(default_factory=dict)
    # CPU seconds each process used while the gateway path ran: the two under test, and
    # the two that share the machine's cores with them (the model server, this client).
    gateway_cpu: float = 0.0
    agent_cpu: float = 0.0
    model_cpu: float = 0.0
    client_cpu: float = 0.0
    # Steal over the gateway path, as a share of the machine's CPU time in it.
    steal_share: float = 0.0
    # The gateway path again with stalled sessions beside it (``--stalled``).
    slow: SlowRun | None = None


async def run_rounds(
    count: int,
    rounds: int,
    one: Callable[[Samples], Awaitable[None]],
    samples: Samples,
    spread: float = 0.0,
) -> None:
    """``rounds`` times, ``count`` readers at once: all in the same instant, or with their
    starts spread evenly over ``spread`` seconds (sessions that are all streaming at the
    same time, as a hundred users' chats are, without every one starting together)."""

    async def started_after(delay: float) -> None:
        await asyncio.sleep(delay)
        await one(samples)

    for _ in range(rounds):
        await asyncio.gather(*(started_after(spread * i / count) for i in range(count)))


async def measure(
    stack: Stack,
    levels: list[int],
    idle: int,
    spread: float = 0.0,
    rounds: int = 0,
    stalled: int = 0,
    lead: float = 0.0,
) -> tuple[list[Level], float]:
    from dexorder.gateway.llm.adapter import load_litellm

    litellm = load_litellm()
    ws_url = stack.gateway_url.replace("http", "ws", 1) + "/ws/chat"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        # Warm every path once: the agent, litellm's first call, the JWKS fetch.
        warm = await open_sessions(http, ws_url, stack.token, 1)
        await warm[0].turn(None)
        await read_litellm(litellm, stack.model_url, Samples())
        await read_raw(http, stack.model_url, Samples())
        # litellm's heap, kept out of this reader's collections (a full one over it would
        # stall every path's reading), as the gateway keeps its own.
        gc.freeze()

        # Idle RSS first: Python keeps freed memory, so later turns would blur it.
        before = rss_kib(stack.gateway_pid)
        idle_sessions = await open_sessions(http, ws_url, stack.token, idle)
        await asyncio.sleep(1)
        after = rss_kib(stack.gateway_pid)
        per_connection_kib = (after - before) / idle
        await asyncio.gather(*(s.close() for s in idle_sessions))
        await warm[0].close()

        results: list[Level] = []
        for count in levels:
            level = Level(count, rounds=rounds or max(1, 30 // count))
            print(f"  {count} sessions x {level.rounds} rounds", flush=True)
            sessions = await open_sessions(http, ws_url, stack.token, count)
            # Warm: each session's MCP session to the agent and its tool list.
            await asyncio.gather(*(s.turn(None) for s in sessions))
            # The gateway first: litellm's own background work (its logging worker) keeps
            # this process busy for a while after its round, and would delay the reading of
            # the gateway's frames here, not their sending there.
            for name, one in (
                ("raw SSE", lambda s: read_raw(http, stack.model_url, s)),
                ("gateway", SessionPool(sessions).turn),
                ("litellm SDK", lambda s: read_litellm(litellm, stack.model_url, s)),
            ):
                level.paths[name] = Samples()
                agents = agents_under(stack.agents_root)
                gateway_before = cpu_seconds([stack.gateway_pid])
                agent_before = cpu_seconds(agents)
                model_before = cpu_seconds([stack.model_pid])
                client_before = cpu_seconds([os.getpid()])
                steal_before = steal_seconds()
                started = time.monotonic()
                await run_rounds(count, level.rounds, one, level.paths[name], spread)
                # CLOCK_MONOTONIC, the clock of the gateway's own logs and diagnostics.
                print(f"    {name}: {started:.3f} to {time.monotonic():.3f}", flush=True)
                if name == "gateway":
                    level.gateway_cpu = cpu_seconds([stack.gateway_pid]) - gateway_before
                    level.agent_cpu = cpu_seconds(agents) - agent_before
                    level.model_cpu = cpu_seconds([stack.model_pid]) - model_before
                    level.client_cpu = cpu_seconds([os.getpid()]) - client_before
                    elapsed = (time.monotonic() - started) * (os.cpu_count() or 1)
                    level.steal_share = (steal_seconds() - steal_before) / elapsed
                    if stalled:
                        print(f"    gateway with {stalled} stalled sessions", flush=True)
                        level.slow = await run_with_stalled(
                            stack, SessionPool(sessions), level, stalled, lead, spread
                        )
            await asyncio.gather(*(s.close() for s in sessions))
            results.append(level)
    return results, per_connection_kib


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


def report(
    levels: list[Level], per_connection_kib: float, idle: int, args: argparse.Namespace
) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        "# Gateway benchmark",
        "",
        f"Command: `.venv/bin/python bench/bench_gateway.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Machine: {os.cpu_count()} cores ({cpu}), load average before the run "
        f"{args.load_before}; Python {platform.python_version()}.",
        f"Model server: {args.rate:g} tokens/s, {args.tokens} tokens a reply, first token at "
        "once; the agent is warm (each session ran one turn first). Each round's messages "
        + (
            f"start spread evenly over {args.tokens / args.rate:g} s (one reply's duration)."
            if args.stagger
            else "are sent in the same instant."
        )
        + f" The model server and the bench client run on {args.harness_loop}'s event loop."
        + (
            " The gateway keeps sessions and limits in Redis (REDIS_URL, on loopback)."
            if args.redis
            else " The gateway keeps sessions and limits in memory (no REDIS_URL)."
        ),
        "",
        "Added first-token latency = first token at the reader minus the message's send, "
        "minus the model server's own time to first token. Relay delay = a token's arrival "
        "minus its departure from the model server. Times in ms.",
        "",
        "| sessions | path | added first token p50 | p99 | relay p50 | relay p99 | replies |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        for name, samples in level.paths.items():
            first, relay = samples.added_first_token, samples.relay
            lines.append(
                f"| {level.sessions} | {name} | {ms(percentile(first, 0.5))} | "
                f"{ms(percentile(first, 0.99))} | {ms(percentile(relay, 0.5))} | "
                f"{ms(percentile(relay, 0.99))} | {len(first)}"
                + (f" ({samples.failures} failed)" if samples.failures else "")
                + " |"
            )
    failed = [
        (level.sessions, name, error)
        for level in levels
        for name, samples in level.paths.items()
        for error in sorted(set(samples.errors))
    ]
    if failed:
        lines += ["", "Failed replies (each distinct error once):", ""]
        lines += [f"- {count} sessions, {name}: {error}" for count, name, error in failed]
    lines += [
        "",
        "Ratios, gateway over litellm SDK read directly (same run, same concurrency):",
        "",
        "| sessions | added first token p50 | p99 | relay p50 | relay p99 |",
        "|---|---|---|---|---|",
    ]
    for level in levels:
        gateway, direct = level.paths["gateway"], level.paths["litellm SDK"]

        def ratio(values: list[float], base: list[float], share: float) -> str:
            denominator = percentile(base, share)
            return f"{percentile(values, share) / denominator:.2f}" if denominator > 0 else "n/a"

        lines.append(
            f"| {level.sessions} | {ratio(gateway.added_first_token, direct.added_first_token, 0.5)}"
            f" | {ratio(gateway.added_first_token, direct.added_first_token, 0.99)}"
            f" | {ratio(gateway.relay, direct.relay, 0.5)} | {ratio(gateway.relay, direct.relay, 0.99)} |"
        )
    lines += [
        "",
        "CPU per reply while the gateway path ran (user + system, over every reply of the level):",
        "",
        "| sessions | gateway process | its agent process | model server | bench client "
        "| steal (other guests) |",
        "|---|---|---|---|---|---|",
    ]
    for level in levels:
        replies = level.sessions * level.rounds
        lines.append(
            f"| {level.sessions} | {ms(level.gateway_cpu / replies)} ms | "
            f"{ms(level.agent_cpu / replies)} ms | {ms(level.model_cpu / replies)} ms | "
            f"{ms(level.client_cpu / replies)} ms | {level.steal_share:.1%} |"
        )
    slow = [level for level in levels if level.slow is not None]
    if slow:
        lines += [
            "",
            "With stalled sessions: the same rounds of the gateway path again, beside sessions "
            "that stop reading once ready and send a message every reply's duration from "
            f"{args.lead:g} s before the rounds to their end. Relay of the normal sessions, "
            "in ms; the gateway's RSS in MiB (after: 35 s after the stalled sockets closed).",
            "",
            "| sessions | stalled | relay p50 | relay p99 | p99 without | p99 ratio | "
            "gateway CPU per normal reply (stalled ones' included) | RSS before / peak / after | cut off |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for level in slow:
            run = level.slow
            assert run is not None
            relay, without = run.normal.relay, level.paths["gateway"].relay
            replies = level.sessions * level.rounds
            cut = "n/a" if run.cut_off is None else f"{run.cut_off:.0f}"
            lines.append(
                f"| {level.sessions} | {run.stalled} | {ms(percentile(relay, 0.5))} | "
                f"{ms(percentile(relay, 0.99))} | {ms(percentile(without, 0.99))} | "
                f"{percentile(relay, 0.99) / percentile(without, 0.99):.2f} | "
                f"{ms(run.gateway_cpu / replies)} ms | {run.rss_before_kib / 1024:.0f} / "
                f"{run.rss_peak_kib / 1024:.0f} / {run.rss_after_kib / 1024:.0f} | {cut} |"
                + (f" ({run.normal.failures} failed)" if run.normal.failures else "")
            )
    lines += [
        "",
        f"RSS per idle connection (gateway process, {idle} authenticated ready sessions): "
        f"{per_connection_kib:.1f} KiB.",
        "",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="dexorder-bench-gateway-"))
    processes: list[ManagedProcess] = []
    try:
        with (
            PostgresService() as postgres,
            RedisService() if args.redis else contextlib.nullcontext() as redis,
        ):
            await save_license(postgres.dsn)
            async with LocalJwksIssuer(issuer=ISSUER, audience=AUDIENCE) as issuer:
                model_port = free_port()
                model = ManagedProcess(
                    "bench-model",
                    [
                        sys.executable,
                        __file__,
                        "serve-model",
                        "--port",
                        str(model_port),
                        "--rate",
                        str(args.rate),
                        "--tokens",
                        str(args.tokens),
                        "--harness-loop",
                        args.harness_loop,
                    ],
                    log_path=workdir / "model.log",
                ).start()
                processes.append(model)
                model_url = f"http://127.0.0.1:{model_port}/v1"
                await asyncio.to_thread(
                    wait_until,
                    lambda: _answers(model_url + "/models"),
                    timeout=60,
                    what="model server",
                    process=model,
                )
                port = free_port()
                redis_url = redis.url if isinstance(redis, RedisService) else None
                metrics_port = free_port()
                gateway = gateway_process(
                    workdir,
                    postgres.dsn,
                    issuer.jwks_url,
                    model_url,
                    port,
                    metrics_port,
                    redis_url,
                    args.gateway_src,
                )
                processes.append(gateway)
                gateway_url = f"http://127.0.0.1:{port}"
                await asyncio.to_thread(
                    wait_until,
                    lambda: _answers(gateway_url + "/ready"),
                    timeout=120,
                    what="gateway",
                    process=gateway,
                )
                stack = Stack(
                    model_url,
                    model.pid,
                    gateway_url,
                    gateway.pid,
                    issuer.mint(USER, expires_in=7200),
                    agents_root=workdir,
                    metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                )
                spread = args.tokens / args.rate if args.stagger else 0.0
                levels, per_connection = await measure(
                    stack, args.levels, args.idle, spread, args.rounds, args.stalled, args.lead
                )
                for process in reversed(processes):
                    await asyncio.to_thread(process.stop, 30)
                processes.clear()
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        for process in reversed(processes):
            process.stop(30)
        # A gateway killed after its stop timeout leaves its agents (own sessions) behind.
        stop_agents_under(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return report(levels, per_connection, args.idle, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "serve-model"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=20.0, help="model tokens per second")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in each reply")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions for the RSS figure")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-gateway.md"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="rounds at every level (default: enough for 30 replies, at least one)",
    )
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="spread each round's starts over one reply's duration instead of one instant",
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="give the gateway a Redis server for its sessions and limits, as replicas share",
    )
    parser.add_argument(
        "--stalled",
        type=int,
        default=0,
        help="run each level's gateway path again with this many sessions that stop reading",
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=15.0,
        help="seconds the stalled sessions stream before the rounds (their buffers fill)",
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        default=None,
        help="run the gateway process from this tree's src (PYTHONPATH), e.g. older code",
    )
    parser.add_argument(
        "--harness-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop of the model server and of this client (the gateway runs its own)",
    )
    args = parser.parse_args(argv)
    if args.command == "serve-model":
        serve_model(args.port, args.rate, args.tokens, args.harness_loop)
        return
    args.load_before = " ".join(f"{value:.2f}" for value in os.getloadavg())
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    with asyncio.Runner(loop_factory=lambda: new_event_loop(args.harness_loop)) as runner:
        text = runner.run(run(args))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
