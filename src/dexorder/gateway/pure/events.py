"""Usage and conversation events, and their JSON form on the wire (Kafka, JSON lines).

Every event carries an ``event_id`` made once, when the event is made: a replay after a
broker outage or a restart sends the same id again, so consumers dedupe on it. The JSON
is a flat object with a ``type`` that says which event it is and a ``schema_version``.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from dexorder.gateway.pure.licenses import UserId

SCHEMA_VERSION: Literal[1] = 1

EventId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]


class EventFormatError(ValueError):
    """Bytes that are not a valid event; the message says what is wrong."""


class EventStream(StrEnum):
    """Which stream (Kafka topic) an event belongs to."""

    USAGE = "usage"
    CONVERSATION = "conversation"


class TurnOutcome(StrEnum):
    COMPLETED = "completed"
    #: The user stopped it (or went away); tokens streamed until then may not be counted.
    CANCELLED = "cancelled"
    #: The model or the agent failed; the user was shown an error.
    FAILED = "failed"


def new_event_id() -> str:
    return uuid.uuid4().hex


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId = Field(default_factory=new_event_id)
    occurred_at: AwareDatetime
    user_id: UserId
    session_id: Name
    #: Groups the events of one turn: its user message, tool calls, reply and usage.
    turn_id: Name
    channel: Name

    @property
    def stream(self) -> EventStream:
        return EventStream.CONVERSATION

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class UsageEvent(_Event):
    """What one turn cost: tokens, money where the price is known, and time."""

    type: Literal["usage"] = "usage"
    tier: Name
    model: str
    prompt_tokens: NonNegativeInt
    completion_tokens: NonNegativeInt
    #: US dollars by LiteLLM's price list; None when it does not know the model.
    cost_usd: NonNegativeFloat | None
    #: From the user's message to the end of the reply.
    latency_ms: NonNegativeFloat
    first_token_ms: NonNegativeFloat | None = None
    tool_calls: NonNegativeInt = 0
    outcome: TurnOutcome = TurnOutcome.COMPLETED

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def stream(self) -> EventStream:
        return EventStream.USAGE


class UserMessageEvent(_Event):
    type: Literal["user_message"] = "user_message"
    content: str


class AssistantReplyEvent(_Event):
    type: Literal["assistant_reply"] = "assistant_reply"
    content: str
    model: str
    outcome: TurnOutcome = TurnOutcome.COMPLETED


class ToolCallEvent(_Event):
    """One tool call the model made, with the agent's answer (None: it never came)."""

    type: Literal["tool_call"] = "tool_call"
    call_id: str
    name: str
    arguments: dict[str, Any]
    result: str | None = None
    is_error: bool | None = None


Event = Annotated[
    UsageEvent | UserMessageEvent | AssistantReplyEvent | ToolCallEvent,
    Field(discriminator="type"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def event_from_json(data: bytes | str) -> Event:
    """Parse one event's JSON; raises ``EventFormatError`` naming each bad field."""
    try:
        return _EVENT.validate_json(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise EventFormatError(f"not a valid event: {problems}") from error
