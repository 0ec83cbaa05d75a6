"""The fake LLM's HTTP server: OpenAI's chat-completions wire format, and a record of requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from dexorder.devenv.fake_llm.scripts import (
    SCRIPT_ADAPTER,
    FailureScript,
    OfflineScript,
    Plan,
    Script,
    TextPlan,
    ToolCallPlan,
    argument_fragments,
    count_completion_tokens,
    count_prompt_tokens,
    plan_reply,
    split_tokens,
)
from dexorder.devenv.process import LOOPBACK, free_port
from dexorder.gateway.pure.routing import LLMTarget

FAKE_API_KEY: Final = "fake-llm-key"
CREATED: Final = 1_700_000_000  # a fixed timestamp keeps every reply byte-for-byte repeatable


# --- OpenAI wire format --------------------------------------------------------------------


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None) -> str:
    return json.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def _finish_reason(plan: Plan) -> str:
    return "stop" if isinstance(plan, TextPlan) else "tool_calls"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error_body(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


#: The failures that answer 200 and fail while streaming.
MIDSTREAM_FAILURES: Final = frozenset({"break_midway", "stall_midway", "keep_alive_only"})
KEEP_ALIVE_SECONDS: Final = 0.2

CONTEXT_WINDOW_MESSAGE: Final = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "9001 tokens. Please reduce the length of the messages."
)


@dataclass
class RecordedRequest:
    """One request as the server saw it, and how its reply ended."""

    index: int
    model: str
    stream: bool
    script: str
    body: dict[str, Any]
    chunks_sent: int = 0
    completed: bool = False
    cut_by_client: bool = False
    broken_by_server: bool = False
    stalled: bool = False
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def finish(self) -> None:
        self.ended_at = time.monotonic()
        self.ended.set()

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model": self.model,
            "stream": self.stream,
            "script": self.script,
            "body": self.body,
            "chunks_sent": self.chunks_sent,
            "completed": self.completed,
            "cut_by_client": self.cut_by_client,
            "broken_by_server": self.broken_by_server,
            "stalled": self.stalled,
            "ended": self.ended_at is not None,
        }


class FakeLLMServer:
    """The server on the running event loop."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        default: Script | None = None,
        scripts: Mapping[str, Script] | None = None,
        tokens_per_second: float | None = None,
        first_token_delay: float = 0.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        # Another address than loopback: a real node's bridge, where pods reach it.
        self.host = host
        self.default: Script = default if default is not None else OfflineScript()
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.tokens_per_second = tokens_per_second
        self.first_token_delay = first_token_delay
        self.requests: list[RecordedRequest] = []
        self._queued: deque[Script] = deque()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def target(self, model: str = "scripted") -> LLMTarget:
        """The litellm arguments that reach this server, with ``model`` choosing the script."""
        return LLMTarget(model=f"openai/{model}", api_base=self.base_url, api_key=FAKE_API_KEY)

    def queue(self, *scripts: Script) -> None:
        """Answer the next requests with these scripts, in order, whatever their model."""
        self._queued.extend(scripts)

    def reset(self) -> None:
        self._queued.clear()
        self.requests.clear()

    async def wait_for_end(self, index: int = -1, within: float = 5.0) -> RecordedRequest:
        """The recorded request once its reply has ended, however it ended."""
        record = self.requests[index]
        await asyncio.wait_for(record.ended.wait(), within)
        return record

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/requests", self._list_requests)
        app.router.add_post("/_fake/queue", self._queue_script)
        app.router.add_put("/_fake/scripts/{model}", self._set_script)
        app.router.add_post("/_fake/reset", self._reset)
        return app

    async def start(self) -> None:
        # Handler cancellation makes a client hang-up reach the handler at once, so a cut
        # stream is recorded even while the script sleeps between tokens.
        self._runner = web.AppRunner(
            self._app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- handlers ---

    async def _models(self, _: web.Request) -> web.Response:
        names = sorted({"scripted", "offline", *self.scripts})
        data = [
            {"id": n, "object": "model", "created": CREATED, "owned_by": "dexorder"} for n in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def _list_requests(self, _: web.Request) -> web.Response:
        return web.json_response([r.summary() for r in self.requests])

    async def _queue_script(self, request: web.Request) -> web.Response:
        self.queue(await _read_script(request))
        return web.json_response({"queued": len(self._queued)})

    async def _set_script(self, request: web.Request) -> web.Response:
        self.scripts[request.match_info["model"]] = await _read_script(request)
        return web.json_response({"models": sorted(self.scripts)})

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def _script_for(self, model: str) -> Script:
        if self._queued:
            return self._queued.popleft()
        return self.scripts.get(model, self.default)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response(
                _error_body("body is not JSON", "invalid_request_error", None), status=400
            )
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return web.json_response(
                _error_body("messages is required", "invalid_request_error", None), status=400
            )
        model = str(body.get("model", ""))
        script = self._script_for(model)
        record = RecordedRequest(
            index=len(self.requests),
            model=model,
            stream=bool(body.get("stream")),
            script=script.kind,
            body=body,
        )
        self.requests.append(record)
        try:
            return await self._reply(request, record, script)
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                record.cut_by_client = True
            raise
        except ConnectionResetError:
            record.cut_by_client = True
            raise
        finally:
            record.finish()

    async def _reply(
        self, request: web.Request, record: RecordedRequest, script: Script
    ) -> web.StreamResponse:
        if isinstance(script, FailureScript):
            if script.failure not in MIDSTREAM_FAILURES:
                return await self._fail(script)
            plan: Plan = TextPlan(script.text)
        else:
            plan = plan_reply(script, record.body)
        rate = script.tokens_per_second or self.tokens_per_second
        if not record.stream:
            await asyncio.sleep(self.first_token_delay)
            record.completed = True
            return web.json_response(self._whole_reply(record, plan))
        breaks_after = script.chunks_before_break if isinstance(script, FailureScript) else None
        failure = script.failure if isinstance(script, FailureScript) else None
        if failure == "keep_alive_only":
            return await self._keep_alive_only(request, record)
        stalls = failure == "stall_midway"
        return await self._stream(request, record, plan, rate, breaks_after, stalls=stalls)

    async def _keep_alive_only(
        self, request: web.Request, record: RecordedRequest
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        record.stalled = True
        while not self._stopping.is_set():
            await response.write(b": keep-alive\n\n")
            await asyncio.sleep(KEEP_ALIVE_SECONDS)
        return response

    async def _fail(self, script: FailureScript) -> web.Response:
        if script.failure == "rate_limit":
            return web.json_response(
                _error_body("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
                status=429,
                headers={"Retry-After": str(script.retry_after)},
            )
        if script.failure == "server_error":
            return web.json_response(
                _error_body(
                    "The server had an error processing your request.", "server_error", None
                ),
                status=500,
            )
        if script.failure == "context_window":
            return web.json_response(
                _error_body(
                    CONTEXT_WINDOW_MESSAGE, "invalid_request_error", "context_length_exceeded"
                ),
                status=400,
            )
        # "hang": never answer; the client's timeout or hang-up ends it, or the server stopping.
        await self._stopping.wait()
        raise web.HTTPServiceUnavailable

    def _whole_reply(self, record: RecordedRequest, plan: Plan) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if isinstance(plan, TextPlan):
            message["content"] = plan.text
        else:
            message["tool_calls"] = [self._tool_call(record, plan)]
        return {
            "id": f"chatcmpl-fake-{record.index}",
            "object": "chat.completion",
            "created": CREATED,
            "model": record.model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(plan)}],
            "usage": _usage(count_prompt_tokens(record.body), count_completion_tokens(plan)),
        }

    @staticmethod
    def _tool_call(record: RecordedRequest, plan: ToolCallPlan) -> dict[str, Any]:
        return {
            "id": f"call_{record.index}_0",
            "type": "function",
            "function": {"name": plan.name, "arguments": plan.arguments_json},
        }

    def _stream_deltas(self, record: RecordedRequest, plan: Plan) -> list[dict[str, Any]]:
        """The deltas of a reply; the first carries the role, as OpenAI's do."""
        if isinstance(plan, TextPlan):
            return [
                {"role": "assistant", "content": ""},
                *({"content": token} for token in split_tokens(plan.text)),
            ]
        call = self._tool_call(record, plan)
        opening = {**call, "index": 0, "function": {"name": plan.name, "arguments": ""}}
        return [
            {"role": "assistant", "content": None, "tool_calls": [opening]},
            *(
                {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                for fragment in argument_fragments(plan.arguments_json)
            ),
        ]

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        plan: Plan,
        tokens_per_second: float | None,
        breaks_after: int | None,
        *,
        stalls: bool = False,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        completion_id = f"chatcmpl-fake-{record.index}"
        interval = 1.0 / tokens_per_second if tokens_per_second else 0.0
        await asyncio.sleep(self.first_token_delay)
        deltas = self._stream_deltas(record, plan)
        for position, delta in enumerate(deltas):
            if breaks_after is not None and record.chunks_sent >= breaks_after:
                if stalls:
                    # Silent but open: only the client's read timeout (or a stop) ends it.
                    record.stalled = True
                    await self._stopping.wait()
                    return response
                record.broken_by_server = True
                if request.transport is not None:
                    request.transport.abort()
                return response
            if position > 1 and interval:
                await asyncio.sleep(interval)
            await response.write(
                f"data: {_chunk(completion_id, record.model, delta, None)}\n\n".encode()
            )
            record.chunks_sent += 1
        finish = _finish_reason(plan)
        await response.write(
            f"data: {_chunk(completion_id, record.model, {}, finish)}\n\n".encode()
        )
        options = record.body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            usage = _usage(count_prompt_tokens(record.body), count_completion_tokens(plan))
            final = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": record.model,
                "choices": [],
                "usage": usage,
            }
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        record.completed = True
        return response


async def _read_script(request: web.Request) -> Script:
    try:
        return SCRIPT_ADAPTER.validate_json(await request.read())
    except ValidationError as error:
        raise web.HTTPBadRequest(text=str(error)) from error
