"""A turn as a stream of typed events, and what is made of them: pure values, no I/O.

``Harness.run_turn`` yields these events; the conversation's runner (``turn_runner``) fans
each one out to the channel, the usage record and the metrics. A channel renders them its
own way: the WebSocket outbox as protocol frames (``frame_for``), Telegram as a message
edited as the reply grows.

Events are frozen and slotted: one is made per streamed token, and it is the only
allocation the relay adds to the text it carries.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from dexorder.gateway.llm.adapter import Usage
from dexorder.gateway.pure import protocol
from dexorder.gateway.pure.routing import RouteChoice

HISTORY_TURNS = 20
"""Past turns a prompt carries (and a carried context keeps)."""

CHARS_PER_TOKEN = 4
"""The usual rule of thumb for English text and JSON: what a token is worth in characters,
for the turns whose usage the model never reported (cancelled or failed mid-stream)."""


TOOL_RESULT_MAX_BYTES = 64 * 1024
"""What of a tool's result is shown, recorded and given to the model, by default."""


def capped_tool_result(content: str, max_bytes: int) -> str:
    """``content`` if it fits in ``max_bytes`` (UTF-8), else its first ``max_bytes`` and a
    line saying how much was left out."""
    encoded = content.encode()
    if len(encoded) <= max_bytes:
        return content
    kept = encoded[:max_bytes].decode(errors="ignore")
    return f"{kept}\n[truncated: {len(encoded) - max_bytes:,} of {len(encoded):,} bytes left out]"


def estimated_tokens(chars: int) -> int:
    """The tokens in ``chars`` characters of text, estimated (rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class AgentContext:
    """What the agent holds for a turn's prompt: the user's preferences and this chat's
    past turns, as read at ``read_at`` (``time.monotonic()``, when the read started)."""

    preferences: dict[str, Any]
    turns: list[dict[str, Any]]
    read_at: float
    #: Made from the previous turn's context and record, not read from the agent.
    carried: bool = False


@dataclass(frozen=True, slots=True)
class ReplyDelta:
    """The next piece of the reply's text, as the model wrote it."""

    content: str


@dataclass(frozen=True, slots=True)
class SourcesCited:
    """Knowledge-base chunks added to the prompt, numbered as the reply's [1], [2]
    citations; comes before any text."""

    items: tuple[protocol.Source, ...]


@dataclass(frozen=True, slots=True)
class ToolStarted:
    """The model called a tool; ``arguments`` is empty when the model's were not JSON
    (then a failed ``ToolFinished`` follows at once)."""

    call_id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolFinished:
    """What the tool call ``call_id`` returned (or why it failed, ``is_error``)."""

    call_id: str
    content: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class FellBack:
    """Another deployment took over the model round; ``notice`` is what the user is told."""

    notice: str


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """The turn is over: the harness's last event, or made by the conversation for a
    cancelled turn (``cancelled``, with what it was billed). ``usage`` adds up every model
    round.

    ``next_context`` is for the conversation alone: the next turn's preferences and history
    when they can be known without reading the agent (``AgentContext.carried``), else None.
    """

    model: str
    usage: Usage
    route: RouteChoice | None
    cancelled: bool = False
    next_context: AgentContext | None = None


TurnEvent = ReplyDelta | SourcesCited | ToolStarted | ToolFinished | FellBack | TurnFinished


@dataclass(slots=True)
class TurnTally:
    """What a turn's events add up to, counted once as they pass (the usage record and the
    metrics both read it): the reply text, when its first piece came
    (``time.perf_counter()``), and how many tools were called. One per message, over
    every attempt at it."""

    first_token_at: float | None = None
    tool_calls: int = 0
    _reply: list[str] = field(default_factory=list)

    def see(self, event: TurnEvent) -> None:
        if isinstance(event, ReplyDelta):  # nearly every event: tested first
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._reply.append(event.content)
        elif isinstance(event, ToolStarted):
            self.tool_calls += 1

    @property
    def reply(self) -> str:
        """The reply text streamed so far."""
        return "".join(self._reply)


def route_frame(route: RouteChoice | None) -> protocol.Route | None:
    """The ``done`` frame's ``route``: the group, the deployment tried first, and why."""
    if route is None:
        return None
    return protocol.Route(**route.summary())


def frame_for(event: TurnEvent) -> protocol.Frame:
    """The protocol frame that shows ``event`` (the WebSocket channel's rendering)."""
    if isinstance(event, ReplyDelta):  # nearly every event: tested first
        return protocol.DeltaFrame(content=event.content)
    if isinstance(event, ToolStarted):
        return protocol.ToolCallFrame(
            id=event.call_id, name=event.name, arguments=dict(event.arguments)
        )
    if isinstance(event, ToolFinished):
        return protocol.ToolResultFrame(
            id=event.call_id, content=event.content, is_error=event.is_error
        )
    if isinstance(event, FellBack):
        return protocol.StatusFrame(stage=protocol.Stage.RETRYING, message=event.notice)
    if isinstance(event, SourcesCited):
        return protocol.SourcesFrame(items=list(event.items))
    if isinstance(event, TurnFinished):
        usage = event.usage
        return protocol.DoneFrame(
            usage=protocol.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            model=event.model,
            cancelled=event.cancelled,
            route=route_frame(event.route),
        )
    assert_never(event)


__all__ = [
    "CHARS_PER_TOKEN",
    "HISTORY_TURNS",
    "TOOL_RESULT_MAX_BYTES",
    "AgentContext",
    "FellBack",
    "ReplyDelta",
    "SourcesCited",
    "ToolFinished",
    "ToolStarted",
    "TurnEvent",
    "TurnFinished",
    "TurnTally",
    "capped_tool_result",
    "estimated_tokens",
    "frame_for",
    "route_frame",
]
