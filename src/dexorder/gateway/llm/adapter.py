"""The LLM adapter: a streamed model round's typed events, and litellm's part in them.

A round is read (``RoundReader``, from either transport's chunks) as ``TextDelta`` as text
arrives; when the round ends, each complete ``ToolCall`` (reassembled from its streamed
fragments), the ``Usage`` if the provider reported it, and a ``Finish``. Models are called
only through ``routing.ModelRouter``, which builds litellm's request here
(``litellm_request``) and closes the upstream stream when its reader stops early, so the
provider stops generating and billing.

Every failure is an ``LLMError`` with a stable code, raised ``from`` litellm's exception
(``wrap_error``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import Any, Final

from dexorder.gateway.pure.routing import LLMTarget

_litellm: ModuleType | None = None


def load_litellm() -> ModuleType:
    """Import litellm once, offline: its price list comes from the package, not the internet.

    The import costs seconds and about 200 MB, so it happens here, at the gateway's start-up,
    and never in a process that does not call a model.
    """
    global _litellm
    if _litellm is None:
        # litellm reads this once, at import; without it the import tries to download prices
        # (an operator who wants the live price list can still set it to False).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        with warnings.catch_warnings():
            # litellm and its dependencies warn at import (deprecations, pydantic schema notes);
            # they are not ours to fix, and must not fail a run with warnings as errors.
            warnings.simplefilter("ignore")
            import litellm

            _warm_up(litellm)

        litellm.suppress_debug_info = True  # no "Give Feedback" banners on every error
        # litellm logs every call at INFO ("completion() model=..."): a log line per message
        # on the relay path, and noise. Its warnings and errors still come through.
        for name in ("LiteLLM", "LiteLLM Proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _litellm = litellm
    return _litellm


def _warm_up(litellm: ModuleType) -> None:
    """One offline call through the whole streaming path (litellm's ``mock_response``).

    litellm imports modules and builds pydantic models on its first call, and pydantic warns
    about their types then; doing it here keeps those warnings, and that delay, out of the
    first chat message.
    """
    reply = litellm.completion(
        model="openai/warm-up",
        messages=[{"role": "user", "content": "warm up"}],
        mock_response="ok",
        stream=True,
        stream_options={"include_usage": True},
    )
    for _ in reply:
        pass


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    content: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; ``arguments_json`` is exactly what the model produced."""

    id: str
    name: str
    arguments_json: str

    def arguments(self) -> dict[str, Any]:
        """The arguments as an object, or ``LLMError(invalid_tool_call)`` if they are not one."""
        try:
            parsed = json.loads(self.arguments_json or "{}")
        except json.JSONDecodeError as error:
            raise LLMError(
                LLMErrorCode.INVALID_TOOL_CALL,
                f"the model's arguments for {self.name} are not JSON: {error}",
            ) from error
        if not isinstance(parsed, dict):
            raise LLMError(
                LLMErrorCode.INVALID_TOOL_CALL,
                f"the model's arguments for {self.name} are not a JSON object",
            )
        return parsed


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    def __add__(self, more: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + more.prompt_tokens,
            self.completion_tokens + more.completion_tokens,
            self.total_tokens + more.total_tokens,
        )


@dataclass(frozen=True)
class Finish:
    """The round is over: ``reason`` is ``stop``, ``tool_calls``, ``length``, ..."""

    reason: str
    model: str


LLMEvent = TextDelta | ToolCall | Usage | Finish


class EncodedTools(tuple[dict[str, Any], ...]):
    """Tools in OpenAI's form, with their JSON encoded once.

    The same tools go with every round of every turn of a session, and an agent's tool
    schemas are kilobytes (the reference agent's fourteen: 7.8 KB, about 90 µs to encode),
    so a request body splices ``json`` in rather than encoding them again each round.
    The dicts are shared by every request that uses them: read them, never change them.
    """

    json: str

    def __new__(cls, tools: Iterable[Mapping[str, Any]] = ()) -> EncodedTools:
        return cls._of([dict(tool) for tool in tools], None)

    @classmethod
    def _of(cls, tools: list[dict[str, Any]], encoded: str | None) -> EncodedTools:
        self = super().__new__(cls, tools)
        self.json = json.dumps(tools) if encoded is None else encoded
        return self

    def extended(self, more: EncodedTools) -> EncodedTools:
        """These tools and then ``more``, joined without encoding either again."""
        if not more:
            return self
        if not self:
            return more
        return EncodedTools._of([*self, *more], f"{self.json[:-1]}, {more.json[1:]}")


def tools_json(tools: Sequence[Mapping[str, Any]]) -> str:
    """The JSON of a request's ``tools``: encoded already, or now."""
    return tools.json if isinstance(tools, EncodedTools) else json.dumps(list(tools))


# --- errors ---------------------------------------------------------------------------------


class LLMErrorCode(StrEnum):
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    CONNECTION_ERROR = "connection_error"
    STREAM_BROKEN = "stream_broken"
    AUTHENTICATION = "authentication"
    BAD_REQUEST = "bad_request"
    INVALID_TOOL_CALL = "invalid_tool_call"
    UNKNOWN = "unknown"


# Worth trying the next deployment: the failure belongs to this deployment, not to the request.
RETRYABLE: Final = frozenset(
    {
        LLMErrorCode.RATE_LIMITED,
        LLMErrorCode.TIMEOUT,
        LLMErrorCode.CONTEXT_WINDOW_EXCEEDED,
        LLMErrorCode.UPSTREAM_ERROR,
        LLMErrorCode.CONNECTION_ERROR,
        LLMErrorCode.STREAM_BROKEN,
    }
)


class LLMError(Exception):
    """A model call failed. ``after_output`` says whether text had already been yielded."""

    def __init__(
        self,
        code: LLMErrorCode,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        after_output: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.after_output = after_output

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after_of(error: BaseException) -> float | None:
    headers = getattr(getattr(error, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _code_of(error: BaseException, litellm: ModuleType) -> LLMErrorCode:
    errors = litellm.exceptions
    if isinstance(error, errors.MidStreamFallbackError):
        # litellm wraps a failure after the stream began; the cause decides, else it is a break.
        cause = error.original_exception
        if cause is not None and isinstance(cause, errors.Timeout | errors.RateLimitError):
            return _code_of(cause, litellm)
        return LLMErrorCode.STREAM_BROKEN
    ordered: list[tuple[type[BaseException] | tuple[type[BaseException], ...], LLMErrorCode]] = [
        (errors.ContextWindowExceededError, LLMErrorCode.CONTEXT_WINDOW_EXCEEDED),
        (errors.RateLimitError, LLMErrorCode.RATE_LIMITED),
        (errors.Timeout, LLMErrorCode.TIMEOUT),
        (
            (errors.AuthenticationError, errors.PermissionDeniedError),
            LLMErrorCode.AUTHENTICATION,
        ),
        (
            (errors.BadRequestError, errors.NotFoundError, errors.UnprocessableEntityError),
            LLMErrorCode.BAD_REQUEST,
        ),
        (errors.APIConnectionError, LLMErrorCode.CONNECTION_ERROR),
        (
            (errors.InternalServerError, errors.ServiceUnavailableError, errors.BadGatewayError),
            LLMErrorCode.UPSTREAM_ERROR,
        ),
    ]
    for kinds, code in ordered:
        if isinstance(error, kinds):
            found = code
            break
    else:
        status = _status_of(error)
        found = (
            LLMErrorCode.UPSTREAM_ERROR
            if status is not None and status >= 500
            else LLMErrorCode.UNKNOWN
        )
    # litellm reports a refused connection as a 500; the cause chain tells the truth.
    if found in (LLMErrorCode.UPSTREAM_ERROR, LLMErrorCode.UNKNOWN) and _never_connected(error):
        return LLMErrorCode.CONNECTION_ERROR
    return found


def _causes(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or any(current is known for known in seen):
            continue
        seen.append(current)
        original = getattr(current, "original_exception", None)
        pending += [current.__cause__, current.__context__]
        if isinstance(original, BaseException):
            pending.append(original)
    return seen


def _never_connected(error: BaseException) -> bool:
    return any(isinstance(cause, ConnectionRefusedError) for cause in _causes(error))


def wrap_error(error: Exception, litellm: ModuleType, *, after_output: bool) -> LLMError:
    """Our error for one of litellm's, keeping its status and Retry-After, and the error
    itself as its ``__cause__``."""
    if isinstance(error, LLMError):
        # Ours already (the wire transport's): only the caller knows whether text was shown.
        error.after_output = error.after_output or after_output
        return error
    detail = getattr(error, "message", None) or str(error) or type(error).__name__
    retry_after = next(
        (seconds for cause in _causes(error) if (seconds := _retry_after_of(cause)) is not None),
        None,
    )
    wrapped = LLMError(
        _code_of(error, litellm),
        str(detail),
        status=_status_of(error),
        retry_after=retry_after,
        after_output=after_output,
    )
    # Set here, not by a ``raise ... from``: a retryable failure is kept, not raised, and may
    # become the cause of the route's last error, which must still lead to the provider's.
    wrapped.__cause__ = error
    return wrapped


# --- the stream -----------------------------------------------------------------------------


# Chunk parsing, for both transports of the routes (gateway.llm.routing).


@dataclass
class ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def tool_calls_from(parts: Mapping[int, ToolCallParts], round_id: str) -> list[ToolCall]:
    return [
        ToolCall(
            # A provider that sends no id still needs one, to pair the result with its call.
            id=part.id or f"{round_id}-call-{index}",
            name=part.name,
            arguments_json="".join(part.arguments),
        )
        for index, part in sorted(parts.items())
    ]


@dataclass
class RoundReader:
    """What one attempt's chunks add up to, besides their text.

    Reads litellm's chunk objects and the wire path's parsed JSON (``gateway.llm.wire``)
    alike, so the router treats both transports the same.
    """

    parts: dict[int, ToolCallParts] = field(default_factory=dict)
    finish_reason: str = "stop"
    round_id: str = "round"
    usage: Usage | None = None

    def read(self, chunk: Any) -> str:
        """Take in one chunk; its text (often empty: a role, a tool-call fragment, usage).

        Anything not shaped as OpenAI's chunk is skipped, never a crash of the round."""
        if type(chunk) is dict:
            text = self._read_text_only(chunk)
            if text is not None:
                return text
        self.round_id = str(_field(chunk, "id") or self.round_id)
        usage = _field(chunk, "usage")
        if usage is not None:
            prompt = int(_field(usage, "prompt_tokens") or 0)
            completion = int(_field(usage, "completion_tokens") or 0)
            total = int(_field(usage, "total_tokens") or 0) or prompt + completion
            self.usage = Usage(prompt, completion, total)
        text = ""
        for choice in _items(_field(chunk, "choices")):
            delta = _field(choice, "delta")
            for fragment in _items(_field(delta, "tool_calls")):
                index = _field(fragment, "index")
                part = self.parts.setdefault(
                    index if isinstance(index, int) else len(self.parts), ToolCallParts()
                )
                if call_id := _field(fragment, "id"):
                    part.id = str(call_id)
                function = _field(fragment, "function")
                if name := _field(function, "name"):
                    part.name = str(name)
                if arguments := _field(function, "arguments"):
                    part.arguments.append(str(arguments))
            if reason := _field(choice, "finish_reason"):
                self.finish_reason = str(reason)
            if content := _field(delta, "content"):
                text += str(content)
        return text

    def _read_text_only(self, chunk: dict[str, Any]) -> str | None:
        """The usual chunk of parsed JSON, read straight: one choice whose delta has text (or
        a role) and nothing else to take in, no tool call, finish reason or usage. None for
        any other chunk, which ``read`` then walks field by field.

        Runs for every token; gives what the walk would: the text, and the chunk's id kept.
        """
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage") is not None:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason"):
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or delta.get("tool_calls"):
            return None
        content = delta.get("content")
        if type(content) is not str:
            if content:
                return None  # text that is not a string: the walk converts it
            content = ""
        if chunk_id := chunk.get("id"):
            self.round_id = chunk_id if type(chunk_id) is str else str(chunk_id)
        return content

    def tool_calls(self) -> list[ToolCall]:
        return tool_calls_from(self.parts, self.round_id)

    def finish(self, model: str) -> Finish:
        reason = self.finish_reason
        if self.parts and reason == "stop":
            reason = "tool_calls"  # some providers say "stop" after a tool call
        return Finish(reason=reason, model=model)


def _field(value: Any, name: str) -> Any:
    """A field of a chunk part: a key of parsed JSON, an attribute of litellm's objects."""
    return value.get(name) if type(value) is dict else getattr(value, name, None)


def _items(value: Any) -> list[Any] | tuple[Any, ...]:
    return value if isinstance(value, list | tuple) else ()


def litellm_request(
    target: LLMTarget,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    *,
    timeout: float,
    max_retries: int = 0,
) -> dict[str, Any]:
    """The arguments of one streamed ``litellm.acompletion`` on one deployment.

    ``timeout`` bounds the connection and each wait for the next chunk. Retries default to
    none: falling back to another deployment is the router's decision, not the SDK's.
    """
    request: dict[str, Any] = {
        **target.litellm_kwargs(),
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "timeout": timeout,
        "max_retries": max_retries,
    }
    if tools:
        request["tools"] = list(tools)
    return request
