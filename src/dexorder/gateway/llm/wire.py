"""The fast path for OpenAI-compatible deployments: their streaming wire protocol, read directly.

OpenAI's Chat Completions API (and the providers that speak it: OpenRouter, vLLM, llama.cpp,
LM Studio, a local test server) streams Server-Sent Events whose ``data`` is one JSON chunk,
ending with ``data: [DONE]``. litellm reads the same stream by building the OpenAI SDK's pydantic
chunk models and then its own, about 0.8 ms of CPU per chunk on this machine against 0.03 ms for
parsing the JSON (BENCHMARKS.md, field notes): at a hundred concurrent replies that alone
saturates a core and delays every token. So for these providers the router (gateway.llm.routing)
streams through this module, and through litellm for every other provider (Anthropic, Gemini,
Ollama...). The model list, the provider prefixes and the routing are the same either way;
``DEXORDER_LLM_TRANSPORT=litellm`` sends everything through litellm.

Chunks are handed on as parsed JSON (dicts, read by ``llm.RoundReader``). Failures are the same
``LLMError`` codes litellm's exceptions map to, so fallbacks behave alike on both paths.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from dexorder.gateway.http_body import ended_within
from dexorder.gateway.llm.adapter import LLMError, LLMErrorCode, tools_json
from dexorder.gateway.pure.routing import LLMTarget
from dexorder.gateway.sse import SSEReader

#: litellm's provider prefixes whose API is OpenAI's Chat Completions, and their default base.
WIRE_PROVIDERS: Final[Mapping[str, str]] = {
    "openai": "https://api.openai.com/v1",
    "openrouter": "https://openrouter.ai/api/v1",
}
_DONE: Final = b"[DONE]"
_READ_BUFFER: Final = 4 * 1024 * 1024
#: The longest SSE line taken (one chunk's JSON; a tool call's arguments can come in one):
#: what aiohttp's line reader allowed with this read buffer.
_MAX_LINE: Final = 2 * _READ_BUFFER
# What OpenAI-compatible servers say when the prompt does not fit (litellm matches these too).
_CONTEXT_WINDOW_HINTS: Final = (
    "context_length_exceeded",
    "maximum context length",
    "context window",
    "too many tokens",
)


@dataclass(frozen=True)
class WireTarget:
    """Where and how one deployment is called on the wire."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    provider: str = "openai"


def wire_target(target: LLMTarget) -> WireTarget | None:
    """The wire form of a deployment whose provider speaks OpenAI's protocol, else None."""
    prefix, _, model = target.model.partition("/")
    default_base = WIRE_PROVIDERS.get(prefix.lower())
    if default_base is None or not model:
        return None
    base = (target.api_base or default_base).rstrip("/")
    return WireTarget(
        url=f"{base}/chat/completions", model=model, api_key=target.api_key, provider=prefix
    )


def _error_detail(body: Any) -> tuple[str, str]:
    """The provider's error message and code (or type), from an OpenAI-style error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = str(error.get("code") or error.get("type") or "")
        return message, code
    if isinstance(error, str):
        return error, ""
    return "", ""


def _retry_after(headers: Mapping[str, str]) -> float | None:
    milliseconds = headers.get("retry-after-ms")
    seconds = headers.get("retry-after")
    try:
        if milliseconds is not None:
            return max(0.0, float(milliseconds) / 1000)
        if seconds is not None:
            return max(0.0, float(seconds))
    except ValueError:
        return None  # an HTTP date: rare from these APIs, and the router's backoff applies
    return None


def error_for_status(
    status: int,
    body: Any,
    *,
    where: str,
    retry_after: float | None = None,
    after_output: bool = False,
) -> LLMError:
    """Our error for a provider's HTTP failure, coded as litellm's exception classes map."""
    message, code = _error_detail(body)
    text = f"{where} answered {status}: {message or 'no message'}"
    lowered = f"{code} {message}".lower()
    if status in (400, 413, 422) and any(hint in lowered for hint in _CONTEXT_WINDOW_HINTS):
        kind = LLMErrorCode.CONTEXT_WINDOW_EXCEEDED
    elif status == 429:
        kind = LLMErrorCode.RATE_LIMITED
    elif status == 408:
        kind = LLMErrorCode.TIMEOUT
    elif status in (401, 403):
        kind = LLMErrorCode.AUTHENTICATION
    elif status in (400, 404, 413, 422):
        kind = LLMErrorCode.BAD_REQUEST
    elif status >= 500:
        kind = LLMErrorCode.UPSTREAM_ERROR
    else:
        kind = LLMErrorCode.UNKNOWN
    return LLMError(kind, text, status=status, retry_after=retry_after, after_output=after_output)


def _finish_reasons(chunk: Mapping[str, Any]) -> list[str]:
    choices = chunk.get("choices")
    if type(choices) is list and len(choices) == 1 and type(choices[0]) is dict:
        # The usual chunk, one choice: the same answer without building a list to filter.
        reason = choices[0].get("finish_reason")
        return [str(reason)] if reason else []
    return [
        str(choice["finish_reason"])
        for choice in (choices if isinstance(choices, list) else ())
        if isinstance(choice, dict) and choice.get("finish_reason")
    ]


def _stream_error_status(chunk: Mapping[str, Any]) -> int:
    """The HTTP status an error inside a stream stands for (its code, else by its words)."""
    error = chunk.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        return code
    message, kind = _error_detail(chunk)
    words = f"{kind} {message} {code or ''}".lower()
    if "rate" in words and "limit" in words:
        return 429
    if any(hint in words for hint in _CONTEXT_WINDOW_HINTS):
        return 400
    return 502  # the provider failed mid-reply: worth the next deployment


#: The scanner behind ``json.loads`` (C), and the whitespace JSON allows after a value.
# (typeshed asks for a scanner: its stub says the decoder it reads is duck-typed, still TODO.)
_scan_json: Final = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_JSON_WHITESPACE: Final = " \t\n\r"


def _load_json(payload: bytes) -> Any:
    """``json.loads(payload)``, minus its generic steps for the usual chunk (an object).

    An event's JSON is parsed for every token. ``json.loads`` on bytes first guesses their
    encoding (UTF-8 for data starting with ``{"``) and decodes them with ``surrogatepass``,
    then scans and checks that only whitespace follows; this does the same, straight.
    """
    if not payload.startswith(b'{"'):
        return json.loads(payload)  # anything unusual: exactly as json.loads reads it
    text = payload.decode("utf-8", "surrogatepass")
    try:
        value, end = _scan_json(text, 0)
    except StopIteration as stop:  # how the scanner says it found no value
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


class WireStream:
    """One streamed reply: iterate for its chunks (dicts); ``aclose`` hangs up at once.

    Hanging up before the end closes the connection rather than returning it to the pool, so
    the provider sees the client gone and stops generating (and billing).
    """

    def __init__(self, response: aiohttp.ClientResponse, where: str) -> None:
        self._response = response
        self._where = where
        self._finished = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        content = self._response.content
        events = SSEReader(_MAX_LINE)
        finish_seen = False
        try:
            while True:
                # Whatever has arrived (usually one whole event), not line by line: reading
                # lines costs two StreamReader calls per event, on every token. The loop is
                # sse.read_events's, inlined: a generator between would cost a step per token.
                block = await content.readany()
                for payload in events.feed(block) if block else events.end():
                    if payload == _DONE:
                        self._finished = True
                        return
                    chunk, finished = self._parse(payload)
                    finish_seen = finish_seen or finished
                    yield chunk
                if not block:
                    break
        except TimeoutError as error:
            # First: aiohttp's read timeout is a TimeoutError, which is also an OSError.
            raise LLMError(
                LLMErrorCode.TIMEOUT, f"{self._where} sent nothing more within the timeout"
            ) from error
        except (aiohttp.ClientError, OSError, ValueError) as error:
            # A dropped connection, a payload cut short, or a line longer than we take
            # (``SSEReader``): the reply is broken either way.
            raise LLMError(
                LLMErrorCode.STREAM_BROKEN, f"{self._where} broke the stream: {error}"
            ) from error
        # The connection ended without [DONE]: a reply that finished is accepted (some
        # servers omit the marker); one that did not was cut off.
        self._finished = finish_seen
        if not finish_seen:
            raise LLMError(
                LLMErrorCode.STREAM_BROKEN, f"{self._where} ended the stream before the reply"
            )

    def _parse(self, payload: bytes) -> tuple[dict[str, Any], bool]:
        """One event's chunk, and whether it finishes the reply (has a finish reason)."""
        try:
            chunk = _load_json(payload)
        except ValueError as error:
            raise LLMError(
                LLMErrorCode.UPSTREAM_ERROR, f"{self._where} sent a chunk that is not JSON"
            ) from error
        if not isinstance(chunk, dict):
            raise LLMError(LLMErrorCode.UPSTREAM_ERROR, f"{self._where} sent a malformed chunk")
        reasons = _finish_reasons(chunk)
        if "error" in chunk or "error" in reasons:
            # An error reported inside the stream, after the headers were sent: OpenAI's
            # servers send an error object, OpenRouter one with finish_reason "error" too.
            raise error_for_status(_stream_error_status(chunk), chunk, where=self._where)
        return chunk, bool(reasons)

    async def aclose(self) -> None:
        ended = False
        try:
            # After [DONE], the end of the body is a moment away: wait for it, or the
            # connection is closed rather than pooled (http_body).
            ended = self._finished and await ended_within(self._response)
        finally:
            if ended:
                self._response.release()  # read to the end: the connection can be reused
            else:
                self._response.close()


def request_body(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
) -> str:
    """A streamed chat completion's JSON body; tools encoded already are spliced in."""
    body = json.dumps(
        {
            "model": model,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    if not tools:
        return body
    return f'{body[:-1]}, "tools": {tools_json(tools)}}}'


class WireClient:
    """Opens streams on OpenAI-compatible deployments over one pooled HTTP session."""

    def __init__(self, *, connections: int = 0) -> None:
        # 0: no limit on concurrent connections; each reply holds one for its duration.
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, limit_per_host=0),
                # An SSE line is one whole chunk; a tool call's arguments can come in one.
                # aiohttp refuses lines over twice this (the default would be 128 KiB).
                read_bufsize=_READ_BUFFER,
            )
        return self._session

    async def open(
        self,
        target: WireTarget,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        timeout: float = 60.0,
    ) -> WireStream:
        """Send the request and wait for the reply's headers; errors are ``LLMError``s.

        ``timeout`` bounds the connection and each wait for data, as litellm's ``timeout`` does.
        """
        body = request_body(target.model, messages, tools)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        where = f"{target.provider}/{target.model}"
        try:
            response = await self._client().post(
                target.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout),
            )
        except TimeoutError as error:  # before OSError, which it is too
            raise LLMError(
                LLMErrorCode.TIMEOUT, f"{where} did not answer within {timeout:g}s"
            ) from error
        except (aiohttp.ClientConnectionError, OSError) as error:
            raise LLMError(
                LLMErrorCode.CONNECTION_ERROR, f"cannot reach {where}: {error}"
            ) from error
        if response.status >= 400:
            try:
                payload = await response.json(content_type=None)
            except (ValueError, aiohttp.ClientError, TimeoutError):
                payload = None
            finally:
                response.release()
            raise error_for_status(
                response.status,
                payload,
                where=where,
                retry_after=_retry_after(response.headers),
            )
        return WireStream(response, where)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
