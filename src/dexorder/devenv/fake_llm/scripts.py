"""The fake LLM's scripts, and how each turns a chat request into a reply plan.

Pure functions of the request body, so every reply is deterministic.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

OFFLINE_LABEL: Final = "[offline scripted model]"
PREFERRED_TOOLS: Final = ("recall", "indicators", "get_preferences", "list_datasets")
INDICATOR_WORDS: Final = ("rsi", "sma", "ema", "macd", "bollinger", "atr", "indicator")
DEMO_PRICES: Final = [round(100 + ((i * 7) % 11) - 5 + i * 0.5, 2) for i in range(40)]


# --- scripts -------------------------------------------------------------------------------


class _Script(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens_per_second: float | None = Field(default=None, gt=0)
    """Overrides the server's token rate for this script."""


class TextScript(_Script):
    """Stream ``text``, one word (with its trailing space) per chunk."""

    kind: Literal["text"] = "text"
    text: str


class ToolScript(_Script):
    """Call ``name`` first; once the request carries the tool's result, answer quoting it."""

    kind: Literal["tool"] = "tool"
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    answer_prefix: str = "The tool returned: "


FailureKind = Literal[
    "rate_limit",
    "server_error",
    "hang",
    "context_window",
    "break_midway",
    "stall_midway",
    "keep_alive_only",
]


class FailureScript(_Script):
    """Fail the way real providers do, for fallback tests.

    ``rate_limit`` is a 429 with ``Retry-After``; ``server_error`` a 500; ``context_window``
    OpenAI's 400 ``context_length_exceeded``; ``hang`` never answers. ``break_midway`` streams
    ``chunks_before_break`` chunks of ``text`` and drops the connection; ``stall_midway``
    streams as many and then sends nothing more, keeping the connection open, until the client
    gives up (its read timeout) or the server stops. ``keep_alive_only`` opens the stream and
    sends only SSE comments (keep-alives), never a chunk, until the client gives up.
    """

    kind: Literal["failure"] = "failure"
    failure: FailureKind
    retry_after: int = 1
    chunks_before_break: int = Field(default=3, ge=0)
    text: str = "This reply will break before it is finished, in the middle of a sentence."


class OfflineScript(_Script):
    """The quick start's stand-in model: calls a tool it is offered, then answers with it."""

    kind: Literal["offline"] = "offline"


Script = Annotated[
    TextScript | ToolScript | FailureScript | OfflineScript, Field(discriminator="kind")
]
SCRIPT_ADAPTER: Final[TypeAdapter[Script]] = TypeAdapter(Script)


# --- what a reply is, once a script has looked at the request ------------------------------


@dataclass(frozen=True)
class TextPlan:
    text: str


@dataclass(frozen=True)
class ToolCallPlan:
    name: str
    arguments_json: str


Plan = TextPlan | ToolCallPlan


def split_tokens(text: str) -> list[str]:
    """Words with their trailing whitespace: the unit the server streams and counts."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # the multi-part form: [{"type": "text", "text": ...}]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def last_user_text(body: Mapping[str, Any]) -> str:
    for message in reversed(_messages(body)):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


@dataclass(frozen=True)
class ToolResult:
    name: str
    content: str


def tool_results_since_last_user(body: Mapping[str, Any]) -> list[ToolResult]:
    """The tool results that answer this turn's tool calls, with the called tools' names."""
    messages = _messages(body)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    names: dict[str, str] = {}
    results = []
    for message in messages[last_user + 1 :]:
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                function = call.get("function") or {}
                names[str(call.get("id"))] = str(function.get("name", "tool"))
        if message.get("role") == "tool":
            name = names.get(str(message.get("tool_call_id")), "tool")
            results.append(ToolResult(name, _text_of(message.get("content"))))
    return results


def offered_tools(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name to its JSON-Schema parameters, from an OpenAI ``tools`` list."""
    tools = body.get("tools")
    offered: dict[str, dict[str, Any]] = {}
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            offered[function["name"]] = parameters if isinstance(parameters, dict) else {}
    return offered


_CHOICES: Final = re.compile(r"[a-z][\w-]*(?:, [a-z][\w-]*)* or [a-z][\w-]*")


def _example_value(schema: Mapping[str, Any], user_text: str) -> Any:
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "string":
        # A description that is only a list of choices ("sma, ema or rsi"): the one the user
        # named, else the first.
        choices = _CHOICES.fullmatch(str(schema.get("description", "")).strip())
        if choices is not None:
            options = re.split(r", | or ", choices.group(0))
            words = set(re.findall(r"[\w-]+", user_text.lower()))
            named = [option for option in options if option in words]
            return (named or options)[0]
        return user_text[:200] or "hello"
    if kind == "integer":
        low, high = schema.get("minimum", 1), schema.get("maximum", 10**9)
        return max(low, min(5, high))
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return False
    if kind == "array":
        items = schema.get("items") or {}
        if items.get("type") == "number":
            return DEMO_PRICES
        if items.get("type") == "string":
            return [user_text[:200] or "hello"]
        return []
    if kind == "object":
        return {}
    return user_text[:200]


def _takes_prices(schema: Mapping[str, Any]) -> bool:
    """A list of numbers, alone or as one choice of an ``anyOf`` (an optional list)."""
    choices = schema.get("anyOf") or [schema]
    return any(
        choice.get("type") == "array" and (choice.get("items") or {}).get("type") == "number"
        for choice in choices
    )


def example_arguments(parameters: Mapping[str, Any], user_text: str) -> dict[str, Any]:
    """Arguments that satisfy a tool's required parameters, made from the user's words, and
    the demo's prices for an optional list of numbers (the offline demo has no saved
    dataset, so a tool that takes prices or a dataset gets the prices)."""
    properties = parameters.get("properties") or {}
    required = [name for name in parameters.get("required") or [] if isinstance(name, str)]
    arguments = {name: _example_value(properties.get(name) or {}, user_text) for name in required}
    for name, schema in properties.items():
        if name not in arguments and isinstance(schema, Mapping) and _takes_prices(schema):
            arguments[name] = DEMO_PRICES
    return arguments


def choose_offline_tool(tools: Mapping[str, Mapping[str, Any]], user_text: str) -> str:
    wants_indicators = any(word in user_text.lower() for word in INDICATOR_WORDS)
    if wants_indicators and "indicators" in tools:
        return "indicators"
    for name in PREFERRED_TOOLS:
        if name in tools:
            return name
    return sorted(tools)[0]


def offline_plan(body: Mapping[str, Any]) -> Plan:
    user_text = last_user_text(body)
    results = tool_results_since_last_user(body)
    if results:
        shown = "\n".join(f"`{r.name}` returned: {r.content[:600]}" for r in results)
        return TextPlan(
            f"{OFFLINE_LABEL} I looked this up on your agent.\n\n{shown}\n\n"
            "Connect a real model (set DEFAULT_MODEL_PROVIDER and a provider key) "
            "for real answers."
        )
    tools = offered_tools(body)
    if not tools:
        return TextPlan(f'{OFFLINE_LABEL} You said: "{user_text[:300]}". I only repeat scripts.')
    name = choose_offline_tool(tools, user_text)
    arguments = example_arguments(tools[name], user_text)
    return ToolCallPlan(name, json.dumps(arguments, sort_keys=True))


def plan_reply(script: TextScript | ToolScript | OfflineScript, body: Mapping[str, Any]) -> Plan:
    if isinstance(script, TextScript):
        return TextPlan(script.text)
    if isinstance(script, ToolScript):
        results = tool_results_since_last_user(body)
        if results:
            return TextPlan(script.answer_prefix + " ".join(r.content for r in results))
        return ToolCallPlan(script.name, json.dumps(script.arguments, sort_keys=True))
    return offline_plan(body)


def argument_fragments(arguments_json: str) -> list[str]:
    """Tool arguments in the fragments they stream in, as real models send them."""
    return [arguments_json[i : i + 8] for i in range(0, len(arguments_json), 8)]


def count_completion_tokens(plan: Plan) -> int:
    if isinstance(plan, TextPlan):
        return len(split_tokens(plan.text))
    return len(argument_fragments(plan.arguments_json))


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    return sum(len(_text_of(m.get("content")).split()) for m in _messages(body)) + 1
