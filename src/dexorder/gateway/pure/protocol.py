"""The WebSocket chat protocol: every frame a client and the gateway exchange, as typed values.

Frames are JSON objects told apart by their `type`. These models are the single source of
truth; `schemas/ws-protocol.schema.json` is generated from them (run this module to print it)
and a unit test keeps the two in step, so the web page, the terminal client and the gateway
all read the same contract.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from json.encoder import encode_basestring as _json_string
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_FRAME_BYTES: Final = 64 * 1024
"""A frame larger than this closes the connection with `CLOSE_MESSAGE_TOO_BIG`."""

AUTH_FRAME_TIMEOUT_SECONDS: Final = 10.0
"""How long a client without an `Authorization` header has to send its `auth` frame."""

CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
"""The session (or the user's license) is not this user's to open."""
CLOSE_TOO_MANY_SOCKETS: Final = 4429
"""The user has as many sockets open as their tier allows; close one and reconnect."""

SCHEMA_ID: Final = "https://dexorder.ai/schemas/ws-protocol.schema.json"


class ErrorCode(StrEnum):
    """Stable codes of `error` frames; clients may branch on them, so never rename one."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    AGENT_UNAVAILABLE = "agent_unavailable"
    LLM_ERROR = "llm_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    LICENSE_REFUSED = "license_refused"
    QUEUE_FULL = "queue_full"
    APPROVAL_INVALID = "approval_invalid"
    INTERNAL = "internal"
    TOO_MANY_SOCKETS = "too_many_sockets"
    AGENTS_AT_CAPACITY = "agents_at_capacity"


class Stage(StrEnum):
    """What the gateway is doing while the user waits, shown as `status` frames."""

    PROVISIONING = "provisioning"
    WAKING = "waking"
    STARTING = "starting"
    READY = "ready"
    QUEUED = "queued"
    RETRYING = "retrying"
    RESUMED = "resumed"


class ProtocolError(Exception):
    """A client frame the gateway cannot accept; `code` goes into the `error` frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameTooLarge(ProtocolError):
    """A frame over `MAX_FRAME_BYTES`; the channel closes with `CLOSE_MESSAGE_TOO_BIG`."""


def _type_is_required(schema: dict[str, Any]) -> None:
    # `type` has a default so that Python code can omit it, but on the wire it is mandatory.
    if "type" in schema.get("properties", {}):
        schema["required"] = ["type", *schema.get("required", [])]


class Frame(BaseModel):
    """A JSON object of the protocol. Unknown fields are refused, so a client's typo shows."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_is_required)


# --- client to gateway ---------------------------------------------------------------------


class AuthFrame(Frame):
    """The first frame of a browser, which cannot set `Authorization` on the upgrade; later,
    a fresh token for the same user, before the current one's `exp`, keeps the socket open
    (without one it closes with 4401 at `exp`). A renewal is answered with `status`
    `ready`; a token for another user or a bad one closes the socket with 4401."""

    type: Literal["auth"] = "auth"
    token: str = Field(min_length=1)


class MessageFrame(Frame):
    """A user message; `id` is the client's own reference, echoed nowhere but logs."""

    type: Literal["message"] = "message"
    content: str = Field(min_length=1)
    id: str | None = Field(default=None, max_length=128)


class CancelFrame(Frame):
    """Stop the running generation, the upstream LLM stream and pending tool calls."""

    type: Literal["cancel"] = "cancel"


class PingFrame(Frame):
    """Keep-alive; answered by `pong`."""

    type: Literal["ping"] = "ping"


class ApprovalFrame(Frame):
    """The user's answer to an `approval_request`."""

    type: Literal["approval"] = "approval"
    request_id: str = Field(min_length=1, max_length=128)
    approve: bool


ClientFrame = Annotated[
    AuthFrame | MessageFrame | CancelFrame | PingFrame | ApprovalFrame,
    Field(discriminator="type"),
]

# --- gateway to client ---------------------------------------------------------------------


class GatewayFrameBase(Frame):
    """What every gateway frame may carry."""

    seq: int | None = Field(
        default=None,
        ge=1,
        description=(
            "The frame's sequence number in its session, on every frame recorded for a "
            "reconnecting client (not on per-connection frames such as `ready` and `pong`). "
            "Reconnect with `?session=<id>&after=<last seq seen>` to get the missed ones."
        ),
    )


class ReadyFrame(GatewayFrameBase):
    """Authentication succeeded; the session is open."""

    type: Literal["ready"] = "ready"
    session_id: str
    user: str
    tier: str
    resumed: bool | None = Field(
        default=None, description="True when the session existed already (within its TTL)."
    )
    last_seq: int | None = Field(
        default=None, ge=0, description="The session's last recorded sequence number."
    )


class StatusFrame(GatewayFrameBase):
    """Progress while the user waits, such as an agent being provisioned or woken."""

    type: Literal["status"] = "status"
    stage: Stage
    message: str


class DeltaFrame(GatewayFrameBase):
    """The next piece of the assistant's reply text."""

    type: Literal["delta"] = "delta"
    content: str


class ToolCallFrame(GatewayFrameBase):
    """The model called a tool on the user's agent."""

    type: Literal["tool_call"] = "tool_call"
    id: str
    name: str
    arguments: dict[str, Any]


class ToolResultFrame(GatewayFrameBase):
    """What a tool call returned; `id` matches its `tool_call`."""

    type: Literal["tool_result"] = "tool_result"
    id: str
    content: str
    is_error: bool = False


class Usage(Frame):
    """Tokens a whole turn used, over every model round."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class Route(Frame):
    """Which model group and deployment answered, and why, so routing is explainable."""

    group: str
    model: str | None = None
    reason: str


class DoneFrame(GatewayFrameBase):
    """The turn is over, finished or cancelled."""

    type: Literal["done"] = "done"
    usage: Usage
    model: str
    cancelled: bool = False
    route: Route | None = None


class ErrorFrame(GatewayFrameBase):
    """Something failed; the connection stays open unless a close frame follows."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retry_after: float | None = Field(
        default=None, ge=0, description="Seconds until a retry may succeed."
    )
    reference: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Names this failure in the gateway's logs, where its detail is; the message "
            "is generic then. Quote it when reporting the problem."
        ),
    )


class PongFrame(GatewayFrameBase):
    """The answer to `ping`."""

    type: Literal["pong"] = "pong"


class ApprovalRequestFrame(GatewayFrameBase):
    """A workflow waits for the user to approve or reject; answered by an `approval` frame."""

    type: Literal["approval_request"] = "approval_request"
    request_id: str
    summary: str
    details: dict[str, Any] = Field(default_factory=dict)


class ApprovalResultFrame(GatewayFrameBase):
    """What became of an `approval`: the decision recorded, and what it means."""

    type: Literal["approval_result"] = "approval_result"
    request_id: str
    decision: Literal["approved", "rejected"]
    message: str


class Source(Frame):
    """A retrieved chunk that was added to the model's context."""

    source: str
    score: float
    title: str | None = None
    excerpt: str | None = None


class SourcesFrame(GatewayFrameBase):
    type: Literal["sources"] = "sources"
    items: list[Source]


GatewayFrame = Annotated[
    ReadyFrame
    | StatusFrame
    | DeltaFrame
    | ToolCallFrame
    | ToolResultFrame
    | DoneFrame
    | ErrorFrame
    | PongFrame
    | ApprovalRequestFrame
    | ApprovalResultFrame
    | SourcesFrame,
    Field(discriminator="type"),
]

CLIENT_FRAME_ADAPTER: Final[TypeAdapter[ClientFrame]] = TypeAdapter(ClientFrame)
GATEWAY_FRAME_ADAPTER: Final[TypeAdapter[GatewayFrame]] = TypeAdapter(GatewayFrame)

CLIENT_FRAME_TYPES: Final = ("auth", "message", "cancel", "ping", "approval")
GATEWAY_FRAME_TYPES: Final = (
    "ready",
    "status",
    "delta",
    "tool_call",
    "tool_result",
    "done",
    "error",
    "pong",
    "approval_request",
    "approval_result",
    "sources",
)


def _load_object(text: str | bytes, known_types: tuple[str, ...]) -> dict[str, Any]:
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_FRAME_BYTES:
        raise FrameTooLarge(
            ErrorCode.BAD_REQUEST, f"frame of {size} bytes exceeds {MAX_FRAME_BYTES} bytes"
        )
    try:
        loaded = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a frame must be a JSON object")
    frame_type = loaded.get("type")
    if frame_type not in known_types:
        shown = "no type" if frame_type is None else f"unknown type {frame_type!r}"
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"frame has {shown}; expected one of {', '.join(known_types)}"
        )
    return loaded


def _describe(error: ValidationError) -> str:
    problems = []
    for detail in error.errors(include_url=False):
        # The first location element is the union tag; the field name is what helps.
        where = ".".join(str(part) for part in detail["loc"][1:]) or "frame"
        problems.append(f"{where}: {detail['msg']}")
    return "; ".join(problems)


def parse_client_frame(text: str | bytes) -> ClientFrame:
    """Decode one frame from a client, or raise `ProtocolError` saying what is wrong."""
    loaded = _load_object(text, CLIENT_FRAME_TYPES)
    try:
        return CLIENT_FRAME_ADAPTER.validate_python(loaded)
    except ValidationError as error:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"invalid {loaded['type']} frame: {_describe(error)}"
        ) from error


def parse_gateway_frame(text: str | bytes) -> GatewayFrame:
    """Decode one frame from the gateway, as the terminal client and the tests read them."""
    loaded = _load_object(text, GATEWAY_FRAME_TYPES)
    try:
        return GATEWAY_FRAME_ADAPTER.validate_python(loaded)
    except ValidationError as error:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"invalid {loaded['type']} frame: {_describe(error)}"
        ) from error


def encode_delta(content: str) -> str:
    """The JSON text of ``DeltaFrame(content=content)``, without building the frame: one is
    sent per streamed token, and building it cost more than the rest of a token's relay."""
    text = _delta_json(content)
    return text if text is not None else encode_frame(DeltaFrame(content=content))


def encode_frame(frame: Frame) -> str:
    """The JSON text of a frame; unset optional fields are left out."""
    if type(frame) is DeltaFrame and frame.seq is None:
        # One per streamed token: built directly (a test keeps it byte for byte pydantic's).
        text = _delta_json(frame.content)
        if text is not None:
            return text
    return frame.model_dump_json(exclude_none=True)


_DELTA_JSON_START: Final = '{"type":"delta","content":'
# Python strings may hold lone surrogates; pydantic refuses to encode them, so such text is
# left to pydantic, which fails the same way it always did.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _delta_json(content: object) -> str | None:
    """What ``model_dump_json(exclude_none=True)`` gives for a ``DeltaFrame`` without ``seq``,
    or None where it must decide itself.

    pydantic writes the fields in their order (``seq`` left out, ``type``, ``content``)
    without spaces, and escapes a string as ``json``'s ``encode_basestring`` does: quote,
    backslash and control characters, the latter as ``\\n``-style or lowercase ``\\u00XX``
    escapes, everything else as it is.
    """
    if type(content) is not str:
        return None  # only a frame built around validation (model_construct) gets here
    if not content.isascii() and _SURROGATE.search(content):
        return None
    return _DELTA_JSON_START + _json_string(content) + "}"


def protocol_json_schema() -> dict[str, Any]:
    """The JSON Schema of the whole protocol, as written to `schemas/ws-protocol.schema.json`."""
    ref_template = "#/$defs/{model}"
    client = CLIENT_FRAME_ADAPTER.json_schema(ref_template=ref_template)
    gateway = GATEWAY_FRAME_ADAPTER.json_schema(ref_template=ref_template)
    definitions: dict[str, Any] = {**client.pop("$defs"), **gateway.pop("$defs")}
    definitions["ClientFrame"] = {
        "description": "A frame sent by a client to the gateway.",
        **client,
    }
    definitions["GatewayFrame"] = {
        "description": "A frame sent by the gateway to a client.",
        **gateway,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Dexorder WebSocket chat protocol",
        "description": (
            "Frames on GET /ws/chat, one JSON object per text message, told apart by `type`. "
            f"A frame over {MAX_FRAME_BYTES} bytes closes the socket with "
            f"{CLOSE_MESSAGE_TOO_BIG}; a bad token closes it with {CLOSE_UNAUTHORIZED}; "
            f"another user's session id or a refused license closes it with {CLOSE_FORBIDDEN}; "
            f"the token's `exp` passing without a renewing `auth` frame closes it with "
            f"{CLOSE_UNAUTHORIZED}; a user's socket past their cap is refused with "
            f"{CLOSE_TOO_MANY_SOCKETS}; "
            f"a gateway shutting down closes it with {CLOSE_SERVICE_RESTART}. Generated from "
            "dexorder.gateway.pure.protocol: python -m dexorder.gateway.pure.protocol > "
            "schemas/ws-protocol.schema.json"
        ),
        "oneOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/GatewayFrame"}],
        "$defs": dict(sorted(definitions.items())),
    }


def protocol_json_schema_text() -> str:
    """The schema file's exact text: stable key order, two-space indent, final newline."""
    return json.dumps(protocol_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(protocol_json_schema_text(), end="")
